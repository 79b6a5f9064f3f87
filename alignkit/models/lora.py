"""LoRA adapters through `peft`: apply them with alignkit's config, merge them back.

alignkit only adds what peft does not: a target module name that matches nothing in the model is
an error naming the linear modules that do exist, instead of peft's generic message (or, for some
spellings, an adapter silently attached to fewer layers than intended).
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from alignkit.config import LoraConfig
from alignkit.errors import ModelError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers (``q_proj``, ``down_proj``...), the names LoRA can target.

    bitsandbytes' ``Linear4bit``/``Linear8bitLt`` subclass ``nn.Linear``, so quantized models list
    the same names; GPT-2 style models use transformers' ``Conv1D`` for their linear layers.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and isinstance(module, torch.nn.Linear | Conv1D)
    }
    return sorted(names)


def _matches(module_name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full name, or its dotted suffix
    return module_name == target or module_name.endswith("." + target)


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} match no module in the model",
            where="lora.target_modules",
            hint=f"linear modules in this model: {', '.join(linear_module_names(model))} "
            "(or use 'all-linear')",
        )


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> PeftModel:
    """Wrap ``model`` in a peft LoRA adapter; the base weights are frozen, the adapter trainable.

    ``task_type="SEQ_CLS"`` (reward models) makes peft keep the scalar ``score`` head fully
    trainable and saved with the adapter (``modules_to_save``), and never wrap it in LoRA.

    ``"all-linear"`` is passed to peft as is: every linear layer except the output head, which
    matters for tied embeddings (an adapter on ``lm_head`` would, once merged, also change the
    input embeddings that share its weight).
    """
    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = list(targets)
        _check_targets(model, targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type=TaskType(task_type),
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # e.g. a target that names a module type LoRA cannot wrap
        raise ModelError(
            f"could not apply LoRA: {exc}",
            where="lora.target_modules",
            hint=f"target linear layers: {', '.join(linear_module_names(model))}",
        ) from exc


def merge_lora(peft_model: PeftModel) -> PreTrainedModel:
    """Fold the adapter into the base weights (W + alpha/r * B A) and return the plain model.

    The merge is done in the base's own precision and changes the base in place. Merge into a
    full-precision base, not a 4-bit one: de-quantizing, adding the delta and re-quantizing to NF4
    rounds most of the (small) LoRA delta away. :func:`alignkit.models.export.export_merged` loads
    the base in full precision for that reason.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_lora expects a peft PeftModel, got {type(peft_model).__name__}")
    return peft_model.merge_and_unload()
