"""Bad input for the preference methods: clear messages, no tracebacks."""

import json

from typer.testing import CliRunner

from alignkit.cli import app

runner = CliRunner()


def train(tmp_path, rows, *overrides):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: dpo\n")
    res = runner.invoke(
        app, ["train", str(cfg), f"data.train={data}", f"output_dir={tmp_path / 'run'}", *overrides]
    )
    assert "Traceback" not in res.output
    return res


PAIR = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}


def test_pair_missing_rejected_names_the_line(tmp_path, tiny_model_dir):
    res = train(tmp_path, [PAIR, {"prompt": "a", "chosen": "b"}], f"model.name={tiny_model_dir}")
    assert res.exit_code != 0
    assert "pairs.jsonl:2" in res.output and "rejected" in res.output


def test_beta_must_be_positive(tmp_path):
    res = train(tmp_path, [PAIR], "dpo.beta=0")
    assert res.exit_code != 0 and "dpo.beta" in res.output and "greater than 0" in res.output


def test_reference_free_methods_refuse_a_reference(tmp_path):
    for method in ("simpo", "orpo"):
        res = train(tmp_path, [PAIR], f"method={method}", "reference.model=some/model")
        assert res.exit_code != 0 and "reference-free" in res.output


def test_reference_that_does_not_load(tmp_path, tiny_model_dir):
    res = train(
        tmp_path,
        [PAIR] * 4,
        f"model.name={tiny_model_dir}",
        "lora.enabled=true",
        f"reference.model={tmp_path / 'nope'}",
        "train.progress=false",
    )
    assert res.exit_code != 0 and "does not exist" in res.output


def test_kto_label_must_be_boolean(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "c", "completion": "d", "label": "false"},
    ]
    res = train(tmp_path, rows, "method=kto", f"model.name={tiny_model_dir}")
    assert res.exit_code != 0 and "pairs.jsonl:2" in res.output and "label" in res.output


def test_adapter_reference_needs_lora(tmp_path, tiny_model_dir):
    res = train(tmp_path, [PAIR] * 4, f"model.name={tiny_model_dir}", "reference.mode=adapter")
    assert res.exit_code != 0 and "reference.mode=adapter" in res.output
