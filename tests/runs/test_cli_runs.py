"""Whole `alignkit train` runs from the command line on a tiny model, and what a second run
into the same directory meets."""

from __future__ import annotations

from tests.unit.test_cli_errors import ROWS, error_message, invoke, write_config, write_jsonl


def test_output_dir_holding_a_run_is_not_overwritten(tmp_path, tiny_model_dir):
    good_file = write_jsonl(tmp_path / "good.jsonl", ROWS)
    cfg = write_config(tmp_path, tiny_model_dir, good_file)
    first = invoke("train", cfg)
    assert first.exit_code == 0, first.output
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "metrics.jsonl" in before and "summary.json" in before

    output = error_message(invoke("train", cfg, "train.lr=1e-3"))
    assert f"output_dir '{run}' already holds a run" in output
    assert "train.resume=auto" in output and "another output_dir" in output
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # not even the resolved config.yaml is rewritten
