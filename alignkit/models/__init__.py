"""Models: resolve names, load (full, LoRA, QLoRA), apply and merge adapters, save and export.

Names are imported on first use (PEP 562): ``alignkit.models.resolve`` is needed by commands that
never touch torch, and importing peft/transformers would cost them seconds at start-up.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# bitsandbytes (imported by peft whenever it is installed) tries to fetch a CPU kernel from the
# hub on import and warns when it cannot, then falls back to its own: nothing a user can act on.
# Set before any model module imports peft; that logger's errors and other loggers still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "DEFAULT_MODEL": "resolve",
    "ResolvedModel": "resolve",
    "resolve_model": "resolve",
    "LoadedModel": "load",
    "ParamCount": "load",
    "count_parameters": "load",
    "load_for_inference": "load",
    "load_model": "load",
    "load_tokenizer": "load",
    "pick_dtype": "load",
    "resolve_chat_template": "load",
    "apply_lora": "lora",
    "linear_module_names": "lora",
    "merge_lora": "lora",
    "export_merged": "export",
    "save_final": "export",
}

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ParamCount",
    "ResolvedModel",
    "apply_lora",
    "count_parameters",
    "export_merged",
    "linear_module_names",
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "pick_dtype",
    "resolve_chat_template",
    "resolve_model",
    "save_final",
]

if TYPE_CHECKING:
    from alignkit.models.export import export_merged, save_final
    from alignkit.models.load import (
        LoadedModel,
        ParamCount,
        count_parameters,
        load_for_inference,
        load_model,
        load_tokenizer,
        pick_dtype,
        resolve_chat_template,
    )
    from alignkit.models.lora import apply_lora, linear_module_names, merge_lora
    from alignkit.models.resolve import DEFAULT_MODEL, ResolvedModel, resolve_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"alignkit.models.{module}"), name)
