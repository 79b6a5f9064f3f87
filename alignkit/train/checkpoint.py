"""Checkpoints that resume to the same result as an uninterrupted run.

A checkpoint holds only what changes during training: the trainable parameters (the LoRA
adapter, or every weight in full fine-tuning), the optimizer and scheduler states, each process's
random number generator states (LoRA dropout draws from them), the fp16 loss scaler's state (a
resumed fp16 run would otherwise restart from the initial scale and skip steps finding it again)
and the position in the data stream. The frozen base is not copied: it is reloaded from the
model it came from. A method with state of its own beyond these (PPO: its KL controller, prompt
position, minibatch shuffle) passes it as `extra`, written before the state file like
everything else.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.errors import AlignkitError

STATE_FILE = "trainer_state.json"
EXTRA_FILE = "method_state.pt"
SCALER_FILE = "scaler.pt"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    micro_index: int = 0  # micro-batches consumed from the data stream
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory without its state file is partial)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    state: TrainerState,
    *,
    rank: int,
    is_main: bool,
    extra: dict[str, Any] | None = None,
    scaler=None,
) -> None:
    """Write one checkpoint; the state file goes last so a crash leaves no 'complete' partial.

    `extra` holds tensors, numbers, strings and containers of them (loadable with
    ``weights_only``); it is read back by :func:`load_extra`.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), ckpt_dir / f"rng-{rank}.pt")
    if not is_main:
        return
    save_file(trainable_state(model), str(ckpt_dir / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt_dir / "scheduler.pt")
    if scaler is not None:  # fp16 mixed precision: accelerate's GradScaler
        torch.save(scaler.state_dict(), ckpt_dir / SCALER_FILE)
    if extra is not None:
        torch.save(extra, ckpt_dir / EXTRA_FILE)
    (ckpt_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def load_checkpoint(
    ckpt_dir: Path, model: nn.Module, optimizer, scheduler, *, rank: int, scaler=None
):
    """Restore a checkpoint in place; returns its TrainerState."""
    weights = load_file(str(ckpt_dir / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise AlignkitError(
            f"checkpoint {ckpt_dir} does not match this model's trainable parameters "
            f"({len(missing)} missing)",
            hint="resume with the same model and lora settings, or use a new output_dir",
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=False))
    if scaler is not None and (ckpt_dir / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(ckpt_dir / SCALER_FILE, weights_only=True))
    rng_file = ckpt_dir / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((ckpt_dir / STATE_FILE).read_text()))


def load_extra(ckpt_dir: Path) -> dict[str, Any]:
    """The `extra` state saved with a checkpoint; empty when it has none."""
    path = ckpt_dir / EXTRA_FILE
    return torch.load(path, weights_only=True) if path.is_file() else {}


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
