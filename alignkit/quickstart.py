"""The quickstart run: LoRA SFT of the default model on bundled GSM8K problems, on CPU.

Before training, SmolLM2-135M-Instruct answers word problems in free prose; after a few minutes
of SFT on GSM8K's worked solutions it answers in their step-by-step form ending with
`#### <number>`, which the before/after samples make visible.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from alignkit.config import RunConfig, load_config

TRAIN_ROWS = 240  # rows 0..239 for training and held-out evaluation
SAMPLE_ROWS = range(380, 383)  # never trained on: shown before and after


def bundled_gsm8k() -> Path:
    return Path(str(resources.files("alignkit") / "assets" / "gsm8k" / "sample.jsonl"))


def quickstart_config(output_dir: str, overrides: list[str]) -> RunConfig:
    data = bundled_gsm8k()
    rows = data.read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(rows[i])["question"] for i in SAMPLE_ROWS]
    base = [
        f"output_dir={output_dir}",
        f"data.train={data}",
        "data.column_map={question: prompt, answer: completion}",
        f"data.limit={TRAIN_ROWS}",
        "data.eval_size=40",
        "data.max_length=384",
        "lora.enabled=true",
        "lora.r=16",
        "lora.alpha=32",
        "train.epochs=1",
        "train.batch_size=4",
        "train.lr=5e-4",
        "train.warmup_ratio=0.05",
        f"train.sample_prompts={json.dumps(prompts)}",
        "train.sample_max_new_tokens=160",
    ]
    return load_config(None, base + list(overrides))
