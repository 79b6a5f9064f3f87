"""Every bad input a user can meet at the command line: a clear error, non-zero exit, no traceback.

Each failure is checked for what went wrong, where (file and line, config key, path) and what to
do about it (the hint after "->"). Commands run in-process through typer's CliRunner against the
tiny random model directory (real SmolLM2 tokenizer), so loading is fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from alignkit.cli import app

GSM8K_MAP = ["--column-map", "question=prompt", "--column-map", "answer=completion"]
ROWS = [{"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}"} for i in range(6)]


# --------------------------------------------------------------------------- helpers


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def failed(result: Result, code: int = 2) -> str:
    """The output of a command that failed cleanly: the exit code asked for, no traceback."""
    # CliRunner catches an escaping exception instead of printing it: that is the traceback case
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}") from (
            result.exception
        )
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    return result.output


def error_message(result: Result) -> str:
    """A failure printed by the CLI's error path: 'error: WHERE: WHAT' then '-> HINT'."""
    output = failed(result, 2)
    assert "error:" in output, output
    return output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check(path: Path | str, model: str, *extra: str) -> Result:
    return invoke("data", "check", path, "--model", model, *extra)


def write_config(tmp_path: Path, model: str, data_file: Path | str, /, **sections) -> Path:
    """A config for a 1-step run of `model` on `data_file`; `sections` add or replace keys."""
    cfg: dict = {
        "model": {"name": model},
        "data": {"train": str(data_file), "max_length": 256},
        "train": {"max_steps": 1, "batch_size": 2, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return path


@pytest.fixture
def good_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", ROWS)


@pytest.fixture(scope="module")
def gsm8k_slice(tmp_path_factory, data_dir) -> Path:
    """The first 30 rows of the real GSM8K train split."""
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    path = tmp_path_factory.mktemp("gsm8k") / "gsm8k30.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- data files

BAD_FILES = {
    # name: (file name, contents, what the message must say)
    "malformed_jsonl_line": (
        "rows.jsonl",
        (json.dumps(ROWS[0]) + "\n") * 3 + '{"prompt": "x", "completion": }\n',
        ["rows.jsonl:4", "not valid JSON", "column 31", "one complete JSON object"],
    ),
    "empty": ("empty.jsonl", "", ["empty.jsonl", "file is empty"]),
    "whitespace_only": ("blank.jsonl", "\n  \n\n", ["blank.jsonl", "file is empty"]),
    "binary_with_nul_bytes": (
        "weights.jsonl",
        bytes(range(256)) * 8,
        ["weights.jsonl", "binary file, not UTF-8 text", "save the data as UTF-8"],
    ),
    "binary_not_utf8": (  # no NUL byte: a PNG header, then a line that does not decode
        "image.jsonl",
        json.dumps(ROWS[0]).encode() + b"\n\x89PNG\r\n\x1a\n\xff\xfe\xfa",
        ["image.jsonl:2", "not UTF-8 text", "re-encode the file as UTF-8"],
    ),
    "json_cut_short": (
        "rows.json",
        json.dumps(ROWS, indent=1)[:-40],
        ["rows.json", "JSON is cut short", "looks truncated"],
    ),
    "json_string_cut_short": (
        "rows2.json",
        json.dumps(ROWS)[:30],
        ["rows2.json", "JSON is cut short", "looks truncated"],
    ),
    "jsonl_row_not_an_object": (
        "lists.jsonl",
        json.dumps(ROWS[0]) + "\n" + "[1, 2]\n",
        ["lists.jsonl:2", "expected a JSON object, got list"],
    ),
    "csv_row_with_extra_fields": (
        "rows.csv",
        "prompt,completion\nWhat is 1+1?,2\nWhat is 1,000 + 1?,1001\n",
        ["rows.csv:3", "3 fields but the header has 2", "quote fields that contain commas"],
    ),
    "unknown_extension": ("rows.txt", "hello\n", ["rows.txt", "unknown data file extension"]),
}


def _write_bad(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    name, content, expected = BAD_FILES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path, expected


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_data_check_bad_file(case, tmp_path, tiny_model_dir):
    path, expected = _write_bad(tmp_path, case)
    output = error_message(check(path, tiny_model_dir))
    for text in expected:
        assert text in output, (text, output)
    assert f"{path}" in output  # the full path, not only the name
    assert "->" in output  # a hint on what to do


@pytest.mark.parametrize(
    "case", ["malformed_jsonl_line", "binary_with_nul_bytes", "json_cut_short"]
)
def test_train_reports_the_same_file_errors(case, tmp_path, tiny_model_dir):
    path, expected = _write_bad(tmp_path, case)
    output = error_message(invoke("train", write_config(tmp_path, tiny_model_dir, path)))
    for text in expected:
        assert text in output, (text, output)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file(tmp_path, tiny_model_dir):
    output = error_message(check(tmp_path / "nope.jsonl", tiny_model_dir))
    assert f"{tmp_path / 'nope.jsonl'}: data file does not exist" in output
    assert "check the path" in output


def test_paths_with_brackets_are_printed_as_they_are(tmp_path, tiny_model_dir):
    """'[draft]' in a path is text, not console markup to be swallowed (or to crash on)."""
    for name in ("[draft] rows.jsonl", "rows[/old].jsonl"):
        output = error_message(check(tmp_path / name, tiny_model_dir))
        assert f"{tmp_path / name}: data file does not exist" in output


def test_data_check_report_of_a_file_with_brackets_in_its_path(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a short relative path: the report table fits it on one line
    (tmp_path / "v[" / "old]").mkdir(parents=True)
    write_jsonl(tmp_path / "v[" / "old]" / "[draft] rows.jsonl", ROWS)
    result = check("v[/old]/[draft] rows.jsonl", tiny_model_dir)  # "[/old]": a closing tag to rich
    assert result.exception is None and result.exit_code == 0, result.output
    assert "v[/old]/[draft] rows.jsonl" in result.stdout  # shown, not swallowed as style tags


def test_columns_matching_no_format_are_listed_with_the_expected_ones(tmp_path, tiny_model_dir):
    rows = [{"query": "What is 2 + 2?", "response": "4"}] * 3
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    result = check(path, tiny_model_dir, "--json")
    failed(result, 1)  # a finding of the preflight report, not a crash
    report = json.loads(result.stdout)
    assert report["format"] == "unknown" and not report["ok"]
    (problem,) = [p for p in report["problems"] if "match no known format" in p]
    assert "found columns: query, response" in problem
    assert "prompt_completion needs prompt/completion" in problem
    assert "messages needs messages" in problem
    assert "data.column_map" in problem

    output = error_message(invoke("train", write_config(tmp_path, tiny_model_dir, path)))
    assert f"{path}: the columns match no known format; found columns: query, response" in output
    assert "prompt_completion needs prompt/completion" in output and "data.column_map" in output


def test_rows_of_the_wrong_shape_are_named_by_line(tmp_path, tiny_model_dir):
    rows = [ROWS[0], {"prompt": 3, "completion": "six"}, ROWS[1]]
    path = write_jsonl(tmp_path / "typed.jsonl", rows)
    report = json.loads(check(path, tiny_model_dir, "--json").stdout)
    assert any(f"{path}:2: prompt must be a string, got int" in p for p in report["problems"])

    output = error_message(invoke("train", write_config(tmp_path, tiny_model_dir, path)))
    assert f"{path}:2: prompt must be a string, got int" in output


# --------------------------------------------------------------------------- data check options


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--truncation", "chop"], ["--truncation:", "'drop', 'truncate' or 'error'", "'chop'"]),
        (["--max-length", "0"], ["--max-length:", "greater than 0"]),
        (["--column-map", "question"], ["--column-map 'question' is not FIELD=CANONICAL"]),
        (["--method", "nonsense"], ["method 'nonsense'"]),
    ],
)
def test_data_check_bad_options_name_the_option(args, expected, good_file, tiny_model_dir):
    output = error_message(check(good_file, tiny_model_dir, *args))
    for text in expected:
        assert text in output, (text, output)
    assert "->" in output


# --------------------------------------------------------------------------- config


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    output = error_message(invoke("train", missing))
    assert f"config file '{missing}' does not exist" in output
    assert "pass the path to a YAML config" in output


def test_config_that_is_not_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: smollm2-135m\ntrain:\n  lr: [1e-4\n", encoding="utf-8")
    output = error_message(invoke("train", path))
    assert f"{path}:5: not valid YAML" in output


@pytest.mark.parametrize(
    ("sections", "overrides", "unknown", "suggested"),
    [
        ({}, ["train.batchsize=2"], "train.batchsize", "train.batch_size"),
        ({"data": {"max_lenght": 256}}, [], "data.max_lenght", "data.max_length"),
        ({"lora": {"alpah": 8}}, [], "lora.alpah", "lora.alpha"),
        ({"outptu_dir": "runs/x"}, [], "outptu_dir", "output_dir"),
        ({}, ["modle.name=smollm2-135m"], "modle", "model"),
    ],
)
def test_unknown_config_key_suggests_the_nearest(
    sections, overrides, unknown, suggested, tmp_path, good_file, tiny_model_dir
):
    path = write_config(tmp_path, tiny_model_dir, good_file, **sections)
    output = error_message(invoke("train", path, *overrides))
    assert f"unknown key '{unknown}'; did you mean '{suggested}'?" in output
    assert f"{path}: invalid configuration" in output  # where
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


@pytest.mark.parametrize(
    ("override", "key", "expected", "got"),
    [
        ("train.batch_size=four", "train.batch_size", "valid integer", "'four'"),
        ("train.lr=fast", "train.lr", "valid number", "'fast'"),
        ("train.epochs=[1]", "train.epochs", "valid number", "[1]"),
        ("lora.enabled=maybe", "lora.enabled", "valid boolean", "'maybe'"),
        ("data.truncation=chop", "data.truncation", "'drop', 'truncate' or 'error'", "'chop'"),
        ("train=3", "train", "valid dictionary", "3"),
    ],
)
def test_wrong_type_in_config_names_the_key(
    override, key, expected, got, tmp_path, good_file, tiny_model_dir
):
    path = write_config(tmp_path, tiny_model_dir, good_file)
    output = error_message(invoke("train", path, override))
    assert f"{path}: invalid configuration" in output
    assert f"'{key}': " in output and expected in output and f"(got {got})" in output
    assert "->" in output


def test_override_without_value(tmp_path, good_file, tiny_model_dir):
    output = error_message(
        invoke("train", write_config(tmp_path, tiny_model_dir, good_file), "train.lr")
    )
    assert "override 'train.lr' has no '='" in output and "section.key=value" in output


def test_wrong_type_in_the_yaml_file_names_the_key(tmp_path, good_file, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, good_file, train={"batch_size": "four"})
    output = error_message(invoke("train", path))
    assert f"{path}: invalid configuration" in output
    assert "'train.batch_size': Input should be a valid integer" in output


# --------------------------------------------------------------------------- model


def test_model_path_that_does_not_exist(tmp_path, good_file):
    missing = tmp_path / "no-such-model"
    cfg = write_config(tmp_path, str(missing), good_file)
    for result in (invoke("train", cfg), check(good_file, str(missing))):
        output = error_message(result)
        assert f"model '{missing}' does not exist" in output
        assert "use a model directory, a .gguf file, a hub id" in output


def test_directory_that_is_not_a_model(tmp_path, good_file):
    (tmp_path / "empty-dir").mkdir()
    output = error_message(check(good_file, str(tmp_path / "empty-dir")))
    assert "holds no config.json (not a model directory)" in output
    assert "save_pretrained" in output


def test_file_that_is_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    output = error_message(invoke("generate", "--model", str(text), "--prompt", "hi"))
    assert f"'{text}' is a file, not a model" in output
    assert "does not exist" not in output


@pytest.mark.parametrize("content", [b"", b"\x07" * 500], ids=["empty", "not-gguf"])
def test_gguf_file_that_cannot_be_read(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    output = error_message(invoke("generate", "--model", str(bad), "--prompt", "hi"))
    assert f"'{bad}' is not a readable GGUF file" in output
    assert "download or convert the GGUF file again" in output


def test_corrupt_weights(tmp_path, good_file, tiny_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    output = error_message(invoke("train", write_config(tmp_path, str(broken), good_file)))
    assert f"the weights in '{broken}' are corrupt or truncated" in output
    assert "download the model again" in output


# --------------------------------------------------------------------------- lengths


def test_max_length_shorter_than_every_prompt(tmp_path, gsm8k_slice, tiny_model_dir):
    result = check(gsm8k_slice, tiny_model_dir, *GSM8K_MAP, "--max-length", "16", "--json")
    failed(result, 1)
    report = json.loads(result.stdout)
    assert report["stats"]["kept"] == 0
    (problem,) = report["problems"]
    assert "max_length=16 is shorter than every prompt" in problem
    assert f"set data.max_length to about {report['suggested_max_length']}" in problem

    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        gsm8k_slice,
        data={"max_length": 16, "column_map": {"question": "prompt", "answer": "completion"}},
    )
    output = error_message(invoke("train", cfg))
    assert "no training rows left: data.max_length=16 is shorter than every prompt" in output
    assert "set data.max_length to about" in output


# --------------------------------------------------------------------------- run directory


# --------------------------------------------------------------------------- data check: success


def test_data_check_on_gsm8k_slice(gsm8k_slice, tiny_model_dir):
    result = check(gsm8k_slice, tiny_model_dir, *GSM8K_MAP, "--max-length", "1024", "--json")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == []
    assert report["format"] == "prompt_completion"
    assert report["rows"] == report["valid_rows"] == report["stats"]["kept"] == 30
    assert report["eot_token"] == "<|im_end|>" and report["eot_in_loss"]

    text = check(gsm8k_slice, tiny_model_dir, *GSM8K_MAP)
    assert text.exit_code == 0 and "prompt_completion" in text.stdout
    assert "No problems found." in text.stdout


def test_data_check_exits_1_when_every_row_is_too_long(gsm8k_slice, tiny_model_dir):
    # 128 tokens: longer than some prompts (57+) but shorter than every whole row (132+)
    args = (*GSM8K_MAP, "--max-length", "128", "--truncation", "drop")
    result = check(gsm8k_slice, tiny_model_dir, *args, "--json")
    failed(result, 1)
    report = json.loads(result.stdout)
    assert not report["ok"] and report["stats"]["kept"] == 0
    assert report["stats"]["dropped_too_long"] == 30
    assert any("every row is longer than max_length=128" in p for p in report["problems"])

    text = failed(check(gsm8k_slice, tiny_model_dir, *args), 1)
    assert "PROBLEM: no rows left" in text


# --------------------------------------------------------------------------- model text


@pytest.fixture(scope="module")
def parrot_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model that always continues '[' -> '/' -> ']' -> '[': it says '[/][/][/]...'.

    Layers are zeroed so the last hidden state is the current token's embedding; each of the
    three tokens embeds to its own basis vector, which the untied LM head maps to the next one.
    """
    from tests.conftest import make_tiny_model

    model = make_tiny_model(tie_word_embeddings=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("[", "/", "]")]
    with torch.no_grad():
        for name, param in model.model.layers.named_parameters():
            if "norm" not in name:
                param.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 3] = 1.0  # every other token: basis vector 3
        head.zero_()
        for k, tok in enumerate(ids):
            emb[tok] = 0.0
            emb[tok, k] = 1.0
            head[ids[(k + 1) % 3], k] = 10.0
        head[ids[0], 3] = 10.0  # after any other token comes '['
    out = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_generate_prints_model_text_as_it_is(parrot_model_dir):
    """'[/]' in a reply is the model's text, not console markup (rich would raise on it)."""
    result = invoke(
        "generate", "--model", parrot_model_dir, "--prompt", "Say [b]hi[/b]", "--max-new-tokens", 9
    )
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "[/][/][/]" in result.stdout
    assert "Say [b]hi[/b]" in result.stdout  # the prompt in the rule, also verbatim
    assert "stopped at the 9-token limit" in result.output
