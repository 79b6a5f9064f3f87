"""Save what training produced so that plain `transformers`/`peft` can load it as it is.

- ``save_final``: a LoRA run saves its adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` onto the base it
  names), a full fine-tune saves the whole model; the tokenizer goes beside either.
- ``export_merged``: folds an adapter into its base and saves a full model that
  ``AutoModelForCausalLM.from_pretrained`` loads with no peft installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from alignkit.errors import ModelError
from alignkit.models.load import ADAPTER_CONFIG, load_for_inference, pick_dtype


def save_final(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save the trained model (adapter only for LoRA/QLoRA) plus the tokenizer into ``out_dir``.

    The adapter records its base as ``base_model_name_or_path``: an absolute directory for local
    models and aliases, so it loads from any working directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        # Only the adapter weights: a few MB instead of a second copy of the base
        model.save_pretrained(out, safe_serialization=True)
    else:
        if getattr(model, "is_loaded_in_4bit", False):
            raise ModelError(
                "a 4-bit model without an adapter cannot be saved as a trained model",
                hint="QLoRA trains an adapter: enable lora with qlora",
            )
        model.save_pretrained(out)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(out)
    return out


def export_merged(src_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write a full model to ``out_dir``: an adapter merged into its base, or a model resaved.

    ``src_dir`` may be anything :func:`resolve_model` accepts, so this also turns a GGUF file or
    an alias into a plain safetensors directory.

    The merge happens in fp32 on the CPU and the result is cast to ``dtype`` afterwards, so a
    bf16 export rounds once instead of at every step of ``W + alpha/r * B A``. A QLoRA adapter
    is merged into the base loaded in full precision, not the 4-bit one it was trained against:
    merging into NF4 would round most of the small LoRA delta away (the delta is usually below
    one quantization step) and leave a 4-bit model. The merged model therefore differs from the
    training-time one by the base's quantization error, the usual QLoRA trade-off.
    """
    src, out = Path(src_dir), Path(out_dir)
    target_dtype = pick_dtype(dtype, "cpu")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ModelError(
            "export source and destination are the same directory",
            hint="choose another output directory",
        )
    if (out / ADAPTER_CONFIG).is_file():
        # AutoModelForCausalLM would keep loading the stale adapter instead of the merged model
        raise ModelError(
            f"'{out}' holds a LoRA adapter; refusing to write a merged model into it",
            hint="choose an empty output directory",
        )
    model, tokenizer = load_for_inference(str(src_dir), "cpu", dtype="fp32")
    model = model.to(target_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
