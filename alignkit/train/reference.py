"""Reference log-probs for the DPO family and KTO, never silently from the wrong model.

Three sources, chosen from the config and stated in the run log:

- ``cache`` (the default whenever the reference is frozen): the reference's log-probs of every
  train and eval example are computed once before training, with the adapter disabled (LoRA) or
  with the model as loaded (full fine-tuning: before the first step the policy *is* the
  reference), and stored on disk keyed by the model and the tokenized data. Training then runs
  one model, once per step.
- ``adapter``: the same model with its LoRA adapter disabled, on the fly: no second copy.
- ``copy``: a separate frozen copy, on the fly (full fine-tuning with an explicit reference).
An explicit ``reference.model`` loads that model (for ``cache`` it is freed after the pass).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alignkit.errors import ConfigError
from alignkit.monitor.progress import Phases
from alignkit.train.method import ReferenceSource, ReferenceUser, to_device

# A batch function: collated batch -> (S,) per-response summed log-probs under a model.
BatchLogps = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def has_adapter(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and bool(
        getattr(model, "peft_config", None)
    )


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The peft model's base alone: LoRA layers bypassed, nothing copied."""
    with model.disable_adapter():
        yield


def choose_mode(requested: str, *, lora: bool, explicit: str | None) -> str:
    """Resolve `reference.mode`; an impossible combination is a config error."""
    if requested == "adapter" and (not lora or explicit):
        raise ConfigError(
            "reference.mode=adapter needs LoRA and no reference.model",
            hint="use reference.mode=cache (default) or copy",
        )
    if requested == "auto":
        return "cache"
    return requested


def _plain(obj: Any) -> Any:
    """Dataclasses and NamedTuples as JSON-able lists and dicts, for hashing."""
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj


def fingerprint(model_id: str, examples: list[Any], extra: str = "") -> str:
    """Cache key: the reference model's identity plus every token of the data."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(extra.encode())
    for ex in examples:
        h.update(json.dumps(_plain(ex), separators=(",", ":")).encode())
    return h.hexdigest()[:24]


def model_identity(path: str) -> str:
    """A model directory's identity: its path plus the size and mtime of its weight files."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [str(p.resolve())]
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.gguf")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(parts)


@torch.no_grad()
def compute_logps(
    module: nn.Module,
    items: list[Any],
    collate: Callable[[list[Any]], dict[str, Tensor]],
    batch_logps: BatchLogps,
    *,
    batch_size: int,
    device: torch.device,
    order: Callable[[list[Any], int], list[list[int]] | None] | None = None,
    phases: Phases | None = None,
    label: str = "reference log-probs",
) -> Tensor:
    """(n, k) log-probs of every item (k responses each), in item order, in eval mode. The
    items are batched `batch_size` at a time in order, or as `order` groups them; `phases`
    shows the pass's progress under `label` (it can take minutes before training starts)."""
    n = len(items)
    batches = order(items, batch_size) if order is not None else None
    grouped = batches is not None
    if batches is None:
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if sorted(i for idx in batches for i in idx) != list(range(n)):
        raise ValueError("the reference batches must hold every item exactly once")
    was_training = module.training
    module.eval()
    table = None
    phases = phases if phases is not None else Phases(enabled=False)
    # Grouped batches (`order`) vary in size: the count of items says more than a batch size.
    detail = f"({n} items)" if grouped else f"of {batch_size}"
    try:
        with phases(label, len(batches), "batches", detail) as progress:
            for idx in batches:
                batch = to_device(collate([items[i] for i in idx]), device)
                logps = batch_logps(module, batch)  # (k * b,): response j of item i at j*b+i
                rows = logps.float().view(-1, len(idx)).T.cpu()  # (b, k)
                if table is None:
                    table = rows.new_zeros(n, rows.shape[1])
                table[idx] = rows
                progress.advance()
    finally:
        module.train(was_training)
    return table if table is not None else torch.zeros(0, 1)


class CachedReference:
    """Precomputed reference log-probs, looked up by (split, example index)."""

    def __init__(self, tables: dict[str, Tensor]):
        self.tables = tables  # split -> (n, k)

    def lookup(self, split: str, index: Tensor) -> Tensor:
        """(b,) example indices -> (k * b,) log-probs in segment order."""
        table = self.tables[split].to(index.device)
        return table[index].T.reshape(-1)

    @staticmethod
    def load_or_build(
        path: Path, build: Callable[[], dict[str, Tensor]], log: Callable[[str], None]
    ) -> CachedReference:
        if path.is_file():
            log(f"[alignkit] reference log-probs: cached, read from {path}")
            return CachedReference(load_file(str(path)))
        tables = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp))
        tmp.replace(path)
        log(f"[alignkit] reference log-probs: computed once and cached in {path}")
        return CachedReference(tables)


def attach_reference(
    cfg, setup, model: nn.Module, wrapped: nn.Module, acc, log, phases: Phases | None = None
) -> str:
    """Give `setup.method` its reference source; returns the mode used (also logged).
    `phases` shows the progress of the precomputing pass (`cache`)."""
    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models import load_model
    from alignkit.models.resolve import cache_dir, resolve_model
    from alignkit.train.checkpoint import checkpoint_dirs
    from alignkit.train.forward import LogpsModel

    explicit = cfg.reference.model
    lora = has_adapter(model)
    mode = choose_mode(cfg.reference.mode, lora=lora, explicit=explicit)
    method: ReferenceUser = setup.method
    fn = method.ref_logps

    def load_reference() -> nn.Module:
        mcfg = ModelConfig(name=explicit) if explicit else cfg.model
        ref = load_model(mcfg, LoraConfig(enabled=False), device=acc.device, for_training=False)
        return LogpsModel(ref, chunk_size=cfg.train.logps_chunk_size).eval()

    if mode == "adapter":

        def live(batch):
            with adapter_disabled(model):
                return fn(wrapped, batch)

        method.use_reference(ReferenceSource(mode, live=live))
        log("[alignkit] reference: the policy with its LoRA adapter disabled (no copy)")
        return mode
    if mode == "copy":
        ref_module = load_reference()
        method.use_reference(ReferenceSource(mode, live=lambda b: fn(ref_module, b)))
        log(f"[alignkit] reference: a separate frozen copy of {explicit or cfg.model.name}")
        return mode
    # cache: one pass over all examples now, with whichever module is the reference
    if explicit:
        ident, source = model_identity(resolve_model(explicit).path), f"'{explicit}'"
    else:
        ident = model_identity(resolve_model(cfg.model.name, cfg.model.gguf_file).path)
        source = "the adapter-disabled base" if lora else "the model before training"
    ident += f"|dtype={cfg.model.dtype}|qlora={cfg.lora.qlora}|adapter_off={lora}"
    key = fingerprint(
        ident,
        [it.example for it in setup.train + setup.eval],
        # The layout too: KTO's packed and padded layouts cut long mismatched rows differently.
        extra=f"{cfg.method}|{type(setup.method).__name__}|{setup.info.get('layout')}",
    )
    path = cache_dir() / "reference" / f"{key}.safetensors"
    resuming = cfg.train.resume == "auto" and checkpoint_dirs(Path(cfg.output_dir))
    if resuming and not lora and not explicit and not path.is_file():
        raise ConfigError(
            f"cannot resume: the cached reference log-probs ({path}) are gone, and the "
            "partly trained model is no longer the reference",
            hint="start the run again in a new output_dir",
        )

    def build() -> dict[str, Tensor]:
        module = load_reference() if explicit else wrapped
        ctx = adapter_disabled(model) if (lora and not explicit) else contextlib.nullcontext()
        kw = {"batch_size": cfg.train.batch_size, "device": acc.device, "order": method.ref_order}

        def pass_over(split: str, items: list[Any]) -> Tensor:
            label = f"reference log-probs ({split})"
            return compute_logps(
                module, items, method.collate, fn, phases=phases, label=label, **kw
            )

        with ctx:
            tables = {"train": pass_over("train", setup.train)}
            if setup.eval:
                tables["eval"] = pass_over("eval", setup.eval)
        return tables

    with acc.main_process_first():
        cache = CachedReference.load_or_build(path, build, log)
    method.use_reference(ReferenceSource(mode, cache=cache))
    log(f"[alignkit] reference: {source}, log-probs precomputed once")
    return mode
