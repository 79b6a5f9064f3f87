"""The model to evaluate and its reference, from whatever the user points at.

- a run directory: its ``final/`` model; the reference is the run's own (``reference.model``,
  else the adapter disabled for LoRA runs, else the model training started from), and ``beta``
  comes from the method's section of ``config.yaml``;
- a LoRA adapter directory: the adapter on its base, unmerged, so the reference is the same
  model with the adapter disabled (one copy in memory, exactly the base it was trained on);
- any other model (HF directory, hub id, GGUF, alias): no reference unless ``--reference``.
An explicit reference always wins, and must share the model's tokenizer: implicit rewards and
side-by-side answers compare token-level log-probs of the same text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from alignkit.errors import ModelError

Which = Literal["model", "reference"]


@dataclass
class RunInfo:
    """What a run directory's config.yaml says about the model it trained."""

    run_dir: Path
    method: str | None
    beta: float | None  # the DPO-style beta of the method, when it has one
    start: str | None  # model.name: where training started
    reference: str | None  # reference.model, when the run named one


def read_run_dir(path: str) -> RunInfo | None:
    """RunInfo for a run directory (config.yaml beside final/), None for anything else."""
    from alignkit.methods import TABLE

    p = Path(path)
    if not (p.is_dir() and (p / "config.yaml").is_file()):
        return None
    if not (p / "final").is_dir():
        raise ModelError(
            "this run directory has no final/ model (training did not finish)",
            where=str(p),
            hint="finish or resume the run (train.resume=auto), or evaluate a checkpoint's model",
        )
    try:
        cfg = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelError(f"config.yaml is not valid YAML ({exc})", where=str(p)) from None
    method = cfg.get("method")
    section = cfg.get(method) if isinstance(method, str) else None
    beta = section.get("beta") if isinstance(section, dict) else None
    # Only a reference-based loss's beta is the implicit reward's (SimPO's scales a per-token
    # reward with no reference)
    row = TABLE.get(method) if isinstance(method, str) else None
    if row is None or row.reference != "required" or not isinstance(beta, int | float):
        beta = None
    model = cfg.get("model") or {}
    start = model.get("name")
    if start and model.get("gguf_file"):
        start = str(Path(start) / model["gguf_file"])
    reference = (cfg.get("reference") or {}).get("model")
    return RunInfo(p, method, float(beta) if beta is not None else None, start, reference)


@dataclass
class EvalModels:
    """The evaluated model, its tokenizer and how to reach the reference (if any)."""

    model: nn.Module
    tokenizer: Any
    model_name: str
    reference_name: str | None
    reference_model: nn.Module | None = None  # a separately loaded reference
    adapter_reference: bool = False  # the reference is `model` with its adapter disabled
    run: RunInfo | None = None

    @property
    def has_reference(self) -> bool:
        return self.adapter_reference or self.reference_model is not None

    @contextlib.contextmanager
    def use(self, which: Which) -> Iterator[nn.Module]:
        """The module that plays `which` for the duration of the block."""
        if which == "model":
            yield self.model
        elif self.adapter_reference:
            from alignkit.train.reference import adapter_disabled

            with adapter_disabled(self.model):
                yield self.model
        elif self.reference_model is not None:
            yield self.reference_model
        else:
            raise ValueError("no reference model")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _same_tokenizer(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def _load_reference(name: str, tokenizer: Any, device) -> nn.Module:
    from alignkit.models import load_for_inference

    model, ref_tok = load_for_inference(name, device)
    if not _same_tokenizer(tokenizer, ref_tok):
        raise ModelError(
            f"the reference '{name}' uses a different tokenizer from the model",
            hint="the reference must share the model's vocabulary (usually the model training "
            "started from); pass it with --reference",
        )
    return model


def load_eval_models(model: str, reference: str | None, device) -> EvalModels:
    """Load the model and its reference as described in the module docstring."""
    from alignkit.models import load_for_inference, resolve_model
    from alignkit.models.load import adapter_base, load_adapter, read_adapter_config

    run = read_run_dir(model)
    path = str(run.run_dir / "final") if run else model
    resolved = resolve_model(path)
    adapter_cfg = read_adapter_config(resolved)
    explicit = reference or (run.reference if run else None)
    if adapter_cfg is not None:
        adapter_dir = str(Path(resolved.path).resolve())
        net, tok = load_adapter(adapter_dir, adapter_cfg, device)
        if explicit is None:
            base = adapter_base(adapter_dir, adapter_cfg)
            return EvalModels(net, tok, model, base, adapter_reference=True, run=run)
    else:
        net, tok = load_for_inference(path, device)
        if explicit is None and run is not None:
            explicit = run.start  # full fine-tuning: the reference is where training started
    if explicit is None:
        return EvalModels(net, tok, model, None, run=run)
    ref = _load_reference(explicit, tok, device)
    return EvalModels(net, tok, model, explicit, reference_model=ref, run=run)
