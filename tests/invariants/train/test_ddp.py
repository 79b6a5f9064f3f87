"""A 2-process DDP run (gloo on CPU, through `accelerate launch`) equals a 1-process run with
twice the batch: same per-step losses and the same final adapter weights. For SFT that is the
loss normalised over the global batch; for KTO also its reference point z0, averaged over the
mismatched rows of every process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[3]


def write_data(tmp_path, data_dir) -> Path:
    rows = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:12]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


SFT_DATA = ["data.column_map={question: prompt, answer: completion}"]


def write_pairs(tmp_path, data_dir) -> Path:
    rows = (data_dir / "hh-rlhf-harmless" / "pairs.jsonl").read_text().splitlines()
    short = [r for r in rows if len(r) < 700][:6]  # 6 pairs -> 12 unpaired KTO examples
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(short) + "\n")
    return path


def run(cmd_prefix, tmp_path, name, data, model_dir, batch, extra=SFT_DATA):
    out = tmp_path / name
    args = [
        "train",
        str(tmp_path / "cfg.yaml"),
        f"output_dir={out}",
        f"model.name={model_dir}",
        f"data.train={data}",
        *extra,
        "data.max_length=160",
        "lora.enabled=true",
        "lora.dropout=0.0",
        "lora.r=4",
        "train.max_steps=3",
        f"train.batch_size={batch}",
        "train.lr=1e-2",
        "train.progress=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*cmd_prefix, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    return losses, load_file(str(out / "final" / "adapter_model.safetensors"))


SINGLE = [sys.executable, "-m", "alignkit"]
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "29517",
    "-m",
    "alignkit.cli",
]


def assert_same_run(one_losses, one, two_losses, two):
    assert len(one_losses) == len(two_losses) == 3
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_processes_equal_one_with_double_batch(tmp_path, tiny_model_dir, data_dir):
    (tmp_path / "cfg.yaml").write_text("method: sft\n")
    data = write_data(tmp_path, data_dir)
    one = run(SINGLE, tmp_path, "one", data, tiny_model_dir, batch=4)
    two = run(LAUNCH, tmp_path, "two", data, tiny_model_dir, batch=2)
    assert_same_run(*one, *two)


def test_kto_two_processes_equal_one_with_double_batch(tmp_path, tiny_model_dir, data_dir):
    (tmp_path / "cfg.yaml").write_text("method: kto\n")
    data = write_pairs(tmp_path, data_dir)
    one = run(SINGLE, tmp_path, "one", data, tiny_model_dir, batch=4, extra=[])
    two = run(LAUNCH, tmp_path, "two", data, tiny_model_dir, batch=2, extra=[])
    assert_same_run(*one, *two)
