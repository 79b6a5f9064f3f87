"""Build a Trainer around a tiny model and synthetic SFT examples, without files."""

from __future__ import annotations

import random

import torch

from alignkit.config import load_config
from alignkit.data import TokenizedExample
from alignkit.train.forward import LogpsModel
from alignkit.train.loop import Trainer
from alignkit.train.sft import SFTMethod


def synthetic_examples(n: int, seed: int = 0, min_len: int = 6, max_len: int = 20):
    """Random token sequences with the first third masked, like a prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randint(3, 900) for _ in range(length)]
        cut = length // 3
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * cut + ids[cut:]))
    return out


def make_trainer(model, examples, run_dir, overrides=(), eval_examples=()):
    from accelerate import Accelerator

    cfg = load_config(None, [f"output_dir={run_dir}", "train.progress=false", *overrides])
    torch.manual_seed(cfg.train.seed)
    acc = Accelerator(cpu=True)
    return Trainer(
        cfg,
        LogpsModel(model, chunk_size=7),
        SFTMethod(pad_id=2, packed=False),
        list(examples),
        list(eval_examples),
        [len(e) for e in examples],
        acc,
        run_dir,
    )
