"""`alignkit eval` end to end on tiny random models: every task writes the report's JSON schema,
and every bad input is one clear error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import Result
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.eval.judge import JudgeUnavailable
from alignkit.eval.run import EvalIncomplete, EvalOptions, run_eval
from tests.conftest import make_tiny_model, tiny_llama_config

PAIRS = [
    {"prompt": f"Say something about {w}.", "chosen": f"{w} is nice.", "rejected": "No."}
    for w in ("cats", "rain", "tea", "maps")
]
HH = [
    {
        "chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello!",
        "rejected": f"\n\nHuman: hi {i}\n\nAssistant: go",
    }
    for i in range(3)
]
GSM8K = [
    {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
    for i in range(3)
]
MC = [
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": 0},
    {"question": "2 + 2?", "choices": ["3", "4"], "answer": "4"},
]
PROMPTS = [{"prompt": "Name a colour."}, {"prompt": "Name a fruit."}, {"prompt": "Count to 3."}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def invoke(*args) -> Result:
    return CliRunner().invoke(app, ["eval", *[str(a) for a in args]])


def ok(result: Result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    return result.output


def failed(result: Result, code: int = 2) -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    assert "error:" in result.output
    return result.output


def check_schema(report: dict, model: str) -> None:
    assert set(report) == {"model", "reference", "results", "samples"}
    assert report["model"] == model
    for res in report["results"]:
        assert set(res) == {"task", "data", "n", "metrics", "details"}
        assert isinstance(res["n"], int) and res["n"] > 0
        for m in res["metrics"].values():
            assert set(m) == {"before", "after", "delta"}
            if m["before"] is not None and m["after"] is not None:
                assert m["delta"] == pytest.approx(m["after"] - m["before"])
            else:
                assert m["delta"] is None
    for s in report["samples"]:
        assert set(s) == {"prompt", "reference", "model"}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tokenizer) -> str:
    """A second tiny model (another seed) with the same tokenizer: a reference."""
    out = tmp_path_factory.mktemp("tiny-other")
    make_tiny_model(seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer) -> str:
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-reward")
    torch.manual_seed(2)
    LlamaForSequenceClassification(tiny_llama_config(num_labels=1)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    rows = {"pairs": PAIRS, "hh": HH, "gsm8k": GSM8K, "mc": MC, "prompts": PROMPTS}
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in rows.items()}


# --------------------------------------------------------------------------- tasks


def test_preference_against_a_reference(tiny_model_dir, other_dir, files, tmp_path):
    out = tmp_path / "eval.json"
    args = ["--model", tiny_model_dir, "--reference", other_dir, "--output", out]
    text = ok(invoke(*args, "--data", files["pairs"], "--data", files["hh"], "--beta", 0.5))
    assert "rewards/accuracies" in text and "logps/accuracy" in text
    report = json.loads(out.read_text())
    check_schema(report, tiny_model_dir)
    assert report["reference"] == other_dir
    pairs, hh = report["results"]
    assert (pairs["task"], pairs["n"], hh["task"], hh["n"]) == ("preference", 4, "preference", 3)
    assert hh["details"]["format"] == "hh" and pairs["details"]["beta"] == 0.5
    m = pairs["metrics"]
    assert m["rewards/accuracies"]["before"] is None and 0 <= m["rewards/accuracies"]["after"] <= 1
    # the margin is beta times the difference of the models' chosen-minus-rejected margins
    own = m["logps/margin"]
    assert m["rewards/margins"]["after"] == pytest.approx(0.5 * own["delta"], abs=1e-4)


def test_preference_without_a_reference_is_reference_free(tiny_model_dir, files, tmp_path):
    out = tmp_path / "eval.json"
    ok(invoke("--model", tiny_model_dir, "--data", files["pairs"], "--output", out))
    report = json.loads(out.read_text())
    check_schema(report, tiny_model_dir)
    assert report["reference"] is None
    metrics = report["results"][0]["metrics"]
    assert "rewards/accuracies" not in metrics
    assert all(m["before"] is None for m in metrics.values())
    assert metrics["logps/accuracy"]["after"] is not None


def test_gsm8k_multiple_choice_and_samples(tiny_model_dir, other_dir, files, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke(
        "--model",
        tiny_model_dir,
        "--reference",
        other_dir,
        "--data",
        files["gsm8k"],
        "--data",
        files["mc"],
        "--max-new-tokens",
        4,
        "--samples",
        2,
        "--output",
        out,
    )
    ok(result)
    report = json.loads(out.read_text())
    check_schema(report, tiny_model_dir)
    gsm, mc = report["results"]
    assert (gsm["task"], gsm["n"], mc["task"], mc["n"]) == ("gsm8k", 3, "multiple_choice", 2)
    assert set(gsm["metrics"]) == {"exact_match", "no_answer"}
    assert set(mc["metrics"]) == {"accuracy", "accuracy_norm"}
    assert mc["details"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # samples: the first prompts of the data, both models' greedy answers
    assert [s["prompt"] for s in report["samples"]] == [GSM8K[0]["question"], GSM8K[1]["question"]]
    assert all(isinstance(s["reference"], str) for s in report["samples"])


def test_samples_task_is_deterministic(tiny_model_dir, other_dir, files, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.json"
        ok(
            invoke(
                "--model",
                tiny_model_dir,
                "--reference",
                other_dir,
                "--data",
                files["prompts"],
                "--task",
                "samples",
                "--samples",
                3,
                "--max-new-tokens",
                5,
                "--output",
                out,
            )
        )
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]
    assert outs[0]["results"] == [] and len(outs[0]["samples"]) == 3


def test_win_rate_with_a_reward_model(tiny_model_dir, other_dir, reward_dir, files, tmp_path):
    out = tmp_path / "eval.json"
    ok(
        invoke(
            "--model",
            tiny_model_dir,
            "--reference",
            other_dir,
            "--data",
            files["prompts"],
            "--reward-model",
            reward_dir,
            "--max-new-tokens",
            4,
            "--output",
            out,
        )
    )
    report = json.loads(out.read_text())
    check_schema(report, tiny_model_dir)
    res = report["results"][0]
    assert res["task"] == "win_rate"
    d = res["details"]
    assert d["wins"] + d["losses"] + d["ties"] == res["n"] and d["unparseable"] == 0
    assert set(res["metrics"]) == {"win_rate", "reward"}
    # a reward judge has no position bias: every prompt is a clean win, loss or tie
    assert all(r["outcome"] in ("win", "loss", "tie") for r in d["records"])


class FlakyJudge:
    """Prefers the longer answer; unreachable after `ok_calls` comparisons."""

    def __init__(self, ok_calls: int):
        self.calls, self.ok_calls = 0, ok_calls

    def compare(self, prompt, first, second):
        self.calls += 1
        if self.calls > self.ok_calls:
            raise JudgeUnavailable("judge endpoint unreachable", hint="start the server")
        return (
            "first" if len(first) > len(second) else "second" if len(second) > len(first) else "tie"
        )


def test_unavailable_judge_keeps_partial_results(tiny_model_dir, other_dir, files, tmp_path):
    out = tmp_path / "eval.json"
    opts = EvalOptions(
        model=tiny_model_dir,
        reference=other_dir,
        data=[files["prompts"]],
        task="win_rate",
        judge_url="http://x",
        judge_model="m",
        max_new_tokens=4,
        output=str(out),
    )
    with pytest.raises(EvalIncomplete, match="unreachable") as exc:
        run_eval(opts, log=lambda m: None, judge=FlakyJudge(ok_calls=4))
    report = json.loads(out.read_text())
    assert report == exc.value.report.to_dict()
    res = report["results"][0]
    assert res["n"] == 2  # two prompts judged in both orders before the judge went away
    assert "unreachable" in res["details"]["error"]


@pytest.fixture
def refusing_server():
    """A local HTTP server that answers every request 404: the judge refuses at once."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "no such model"}}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_unavailable_judge_exits_non_zero(
    tiny_model_dir, other_dir, files, tmp_path, refusing_server
):
    out = tmp_path / "eval.json"
    result = invoke(
        "--model",
        tiny_model_dir,
        "--reference",
        other_dir,
        "--data",
        files["pairs"],
        "--data",
        files["prompts"],
        "--judge-url",
        refusing_server,
        "--judge-model",
        "m",
        "--max-new-tokens",
        2,
        "--output",
        out,
    )
    text = failed(result, code=1)
    assert "refused the request (404)" in text
    report = json.loads(out.read_text())
    # what was finished before the judge failed is kept, and the win rate says why it stopped
    assert [r["task"] for r in report["results"]] == ["preference", "win_rate"]
    assert report["results"][0]["metrics"]["rewards/accuracies"]["after"] is not None
    assert "404" in report["results"][1]["details"]["error"]


# --------------------------------------------------------------------------- run directories


def test_full_finetune_run_dir(tiny_model_dir, other_dir, files, tmp_path):
    """final/ is the trained model, the reference is where training started, eval.json lands in
    the run directory; simpo's beta is not an implicit-reward beta, so the default is used."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in Path(other_dir).iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    cfg = {"method": "simpo", "model": {"name": tiny_model_dir}, "simpo": {"beta": 2.0}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ok(invoke("--model", run, "--data", files["pairs"]))
    report = json.loads((run / "eval.json").read_text())
    check_schema(report, str(run))
    assert report["reference"] == tiny_model_dir
    assert report["results"][0]["details"]["beta"] == 0.1


def test_lora_run_dir_reads_beta_and_disables_the_adapter(
    tiny_model_dir, tokenizer, files, tmp_path
):
    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models import load_model, save_final
    from alignkit.models.lora import apply_lora

    base = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), for_training=False)
    peft = apply_lora(base, LoraConfig(enabled=True, r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    run = tmp_path / "run"
    save_final(peft, tokenizer, run / "final")
    cfg = {"method": "dpo", "model": {"name": tiny_model_dir}, "dpo": {"beta": 0.3}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ok(invoke("--model", run, "--data", files["pairs"]))
    report = json.loads((run / "eval.json").read_text())
    res = report["results"][0]
    assert res["details"]["beta"] == 0.3
    assert Path(report["reference"]).resolve() == Path(tiny_model_dir).resolve()
    m = res["metrics"]
    assert m["rewards/margins"]["after"] == pytest.approx(
        0.3 * m["logps/margin"]["delta"], abs=1e-4
    )
    assert m["logps/margin"]["delta"] != pytest.approx(0.0, abs=1e-4)  # the adapter matters


# --------------------------------------------------------------------------- bad input


def test_wrong_format_names_columns_and_formats(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1, "bar": "x"}])
    text = failed(invoke("--model", tiny_model_dir, "--data", bad))
    assert "found columns: bar, foo" in text
    assert "question/choices/answer" in text and "prompt/chosen/rejected" in text


def test_forced_task_that_does_not_fit(tiny_model_dir, files):
    text = failed(invoke("--model", tiny_model_dir, "--data", files["pairs"], "--task", "gsm8k"))
    assert "--task gsm8k expects" in text and "chosen" in text


def test_empty_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "file is empty" in failed(invoke("--model", tiny_model_dir, "--data", empty))


def test_missing_model_path(files, tmp_path):
    text = failed(invoke("--model", tmp_path / "nope", "--data", files["pairs"]))
    assert "does not exist" in text


@pytest.mark.parametrize(("answer", "message"), [(5, "out of range"), ("Berlin", "not one of")])
def test_bad_multiple_choice_answer(tiny_model_dir, tmp_path, answer, message):
    rows = [MC[0], {"question": "q", "choices": ["Paris", "Rome"], "answer": answer}]
    text = failed(
        invoke("--model", tiny_model_dir, "--data", write_jsonl(tmp_path / "mc.jsonl", rows))
    )
    assert message in text and "mc.jsonl:2" in text


def test_win_rate_without_a_judge(tiny_model_dir, files):
    text = failed(
        invoke("--model", tiny_model_dir, "--data", files["prompts"], "--task", "win_rate")
    )
    assert "needs a judge" in text and "--reward-model" in text


def test_prompt_only_rows_without_judge_or_samples(tiny_model_dir, files):
    text = failed(invoke("--model", tiny_model_dir, "--data", files["prompts"]))
    assert "--reward-model" in text and "--samples" in text


def test_win_rate_without_a_reference(tiny_model_dir, reward_dir, files):
    text = failed(
        invoke(
            "--model",
            tiny_model_dir,
            "--data",
            files["prompts"],
            "--reward-model",
            reward_dir,
            "--max-new-tokens",
            2,
        )
    )
    assert "--reference" in text


def test_a_reward_model_that_is_not_one(tiny_model_dir, other_dir, files):
    text = failed(
        invoke(
            "--model",
            tiny_model_dir,
            "--reference",
            other_dir,
            "--data",
            files["prompts"],
            "--reward-model",
            other_dir,
        )
    )
    assert "not an alignkit/transformers reward model" in text
