"""`train.resume=auto` through `alignkit train`: a finished run is left as it is, and a resumed
run's metrics.jsonl holds each step once, in order.

The convention: step 0 is the evaluation before training; every later step has one row, the
evaluation after training merged into the last step's row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.train.run import run_training


def sft_config(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={data}",
            "data.eval_size=4",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "train.batch_size=2",
            "train.save_every=2",
            "train.log_every=1",
            "train.resume=auto",
            "train.progress=false",
        ],
    )


def steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines]


def snapshot(run_dir) -> dict[str, tuple[int, bytes]]:
    """Every file of the run directory: its mtime and its bytes."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished(tmp_path, tiny_model_dir):
    cfg = sft_config(tmp_path, tiny_model_dir)
    summary = run_training(cfg, log=lambda m: None)
    return cfg, summary


def test_finished_run_with_resume_auto_changes_nothing(finished):
    cfg, summary = finished
    run_dir = Path(cfg.output_dir)
    before = snapshot(run_dir)
    logged: list[str] = []
    again = run_training(cfg, log=logged.append)
    assert again == json.loads((run_dir / "summary.json").read_text())
    assert again["steps"] == summary["steps"] == 6
    assert snapshot(run_dir) == before  # metrics, final/, checkpoints, config: untouched
    (note,) = logged
    assert "finished" in note and str(run_dir / "summary.json") in note
    assert "To train further" in note and "a new output_dir" in note
    assert steps(run_dir) == [0, 1, 2, 3, 4, 5, 6]


def test_resumed_run_logs_each_step_once_in_order(finished):
    """Killed after its last step but before writing final/ and summary.json: the resumed run
    trains steps 5 and 6 again from the step-4 checkpoint and its rows replace theirs."""
    cfg, first = finished
    run_dir = Path(cfg.output_dir)
    full = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "final")
    summary = run_training(cfg, log=lambda m: None)
    assert summary["steps"] == 6
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert set(rows[-1]) == set(full[-1])  # the last step's row holds the eval after training
    assert "eval/loss" in rows[-1] and "loss" in rows[-1]
    # the evaluation before training, from its step-0 row: not lost from the summary
    assert summary["eval_before"] == first["eval_before"] and summary["eval_before"]
