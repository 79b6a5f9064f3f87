"""Load models and tokenizers ready to train: full fine-tuning, LoRA, or QLoRA (4-bit NF4 base).

Every failure a user can cause (a path that is not a model, a corrupt weights file, a hub id with
no network, QLoRA without bitsandbytes) becomes a :class:`ModelError` with a hint; the original
exception stays chained for debugging.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import ConfigError, ModelError
from alignkit.models.lora import apply_lora, merge_lora
from alignkit.models.resolve import ALIASES, ResolvedModel, resolve_model
from alignkit.ops.swiglu import use_lean_swiglu

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: Any


def pick_dtype(
    requested: str, device: torch.device | str, *, bf16_supported: bool | None = None
) -> torch.dtype:
    """The dtype to load weights in.

    ``auto``: bf16 on CUDA devices that support it (same range as fp32, no loss scaling), fp16
    on older CUDA, fp32 on CPU (half-precision matmuls there are slow and, in fp16, lossy).
    ``bf16_supported`` overrides the CUDA capability check (None asks torch).
    """
    device = torch.device(device)
    if requested != "auto" and requested not in DTYPES:
        raise ConfigError(
            f"unknown dtype '{requested}'", where="model.dtype", hint="use auto, fp32, bf16 or fp16"
        )
    if device.type != "cuda":
        return DTYPES.get(requested, torch.float32)
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return torch.bfloat16 if bf16_supported else torch.float16
    if requested == "bf16" and not bf16_supported:
        raise ModelError(
            "this GPU does not support bf16", where="model.dtype", hint="use fp16 or fp32"
        )
    return DTYPES[requested]


def count_parameters(model: torch.nn.Module) -> ParamCount:
    """Trainable and total parameter counts (tied weights counted once).

    A bitsandbytes 4-bit parameter stores two values per byte of its storage dtype, so its
    ``numel()`` is scaled back up to the number of weights it represents.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


# --------------------------------------------------------------------------- tokenizer


def resolve_chat_template(value: str) -> str:
    """A named template from ``alignkit.data.templates.NAMED_TEMPLATES``, or a Jinja string."""
    try:
        from alignkit.data.templates import NAMED_TEMPLATES
    except ModuleNotFoundError as exc:
        if exc.name not in ("alignkit.data.templates", "alignkit.data"):
            raise
        NAMED_TEMPLATES = {}
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" not in value and "{%" not in value:
        # Not Jinja: most likely a misspelt name, which would otherwise render as literal text
        names = ", ".join(sorted(NAMED_TEMPLATES)) or "(none available)"
        raise ConfigError(
            f"unknown chat template '{value}'",
            where="model.chat_template",
            hint=f"use a named template ({names}) or a Jinja template string",
        )
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(value)
    except TemplateSyntaxError as exc:
        raise ConfigError(
            f"chat template is not valid Jinja: {exc.message} (line {exc.lineno})",
            where="model.chat_template",
        ) from None
    return value


def _tokenizer_from(path: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not load a tokenizer from '{path}': {_first_line(exc)}",
            hint="save the tokenizer beside the model (tokenizer.save_pretrained(dir))",
        ) from exc


def _prepare_tokenizer(tokenizer: Any, chat_template: str | None) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                "the tokenizer has neither a pad nor an eos token",
                hint="use a tokenizer that defines eos_token",
            )
        # Padding is masked out of attention and loss, so reusing eos costs nothing; adding a
        # new token would instead need the embeddings resized.
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps each sequence starting at position 0 for training; generation code
    # that needs left padding sets it itself.
    tokenizer.padding_side = "right"
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token, right padding and the configured chat template.

    A tokenizer without a chat template is left without one when none is configured: the data
    module has its own fallback.
    """
    if cfg.chat_template:
        resolve_chat_template(cfg.chat_template)  # a bad template fails before any loading
    resolved = resolve_model(cfg.name, cfg.gguf_file)
    path = _local_path(resolved)
    tokenizer = _tokenizer_from(path, resolved.gguf_file, cfg.trust_remote_code)
    return _prepare_tokenizer(tokenizer, cfg.chat_template)


# --------------------------------------------------------------------------- model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _local_path(resolved: ResolvedModel) -> str:
    # Absolute, so that adapters saved from this model record a base path usable from any cwd
    return resolved.path if resolved.kind == "hub" else str(Path(resolved.path).resolve())


@contextlib.contextmanager
def _load_errors(resolved: ResolvedModel) -> Iterator[None]:
    """Turn what `from_pretrained` raises on bad user input into a ModelError with a hint."""
    try:
        yield
    except OSError as exc:
        msg = _first_line(exc)
        if resolved.kind == "hub":
            offline = "connect" in str(exc).lower() or "offline" in str(exc).lower()
            hint = (
                "no network to the hub; download it or use a local directory"
                if offline
                else "check the hub id (org/name), or log in for gated models"
            )
            raise ModelError(
                f"could not fetch '{resolved.path}' from the hub: {msg}", hint=hint
            ) from exc
        raise ModelError(
            f"could not load the model from '{resolved.path}': {msg}",
            hint="the directory needs config.json and its weights (model.safetensors); "
            "re-save it with save_pretrained",
        ) from exc
    except (SafetensorError, pickle.UnpicklingError, EOFError) as exc:
        raise ModelError(
            f"the weights in '{resolved.path}' are corrupt or truncated: {_first_line(exc)}",
            hint="copy or download the model again",
        ) from exc
    except torch.OutOfMemoryError as exc:  # a RuntimeError, but not a broken checkpoint
        raise ModelError(
            f"not enough memory to load '{resolved.path}': {_first_line(exc)}",
            hint="use lora.qlora=true, a bf16/fp16 model.dtype, or a smaller model",
        ) from exc
    except (ValueError, RuntimeError, KeyError) as exc:
        if resolved.gguf_file:  # an empty, cut-short or foreign file with a .gguf name
            where = Path(resolved.path) / resolved.gguf_file
            raise ModelError(
                f"'{where}' is not a readable GGUF file: {_first_line(exc)}",
                hint="download or convert the GGUF file again",
            ) from exc
        # unknown model_type, weights that do not fit the config (size mismatch), ...
        raise ModelError(
            f"could not load the model from '{resolved.path}': {_first_line(exc)}",
            hint="check that config.json and the weights belong together",
        ) from exc


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken install raises RuntimeError/OSError, not ImportError
        raise ModelError(
            f"lora.qlora needs bitsandbytes, which could not be imported: {_first_line(exc)}",
            where="lora.qlora",
            hint="pip install bitsandbytes, or set lora.qlora=false",
        ) from exc


def _nf4_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    # QLoRA (Dettmers et al. 2023): NF4 for normally distributed weights, plus double
    # quantization of the per-block scales (~0.4 bit/param saved).
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _load_gguf(path: str, gguf_file: str, kwargs: dict[str, Any]) -> PreTrainedModel:
    """A GGUF checkpoint as a plain, trainable and saveable model.

    transformers keeps a GGUF quantizer attached to the model it loads, which marks it neither
    trainable nor serializable; the de-quantized weights are copied into a model built from the
    same config, which has no quantizer.
    """
    from transformers import AutoConfig, GgufConfig

    loaded = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    config = AutoConfig.from_pretrained(
        path, gguf_file=gguf_file, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    plain = AutoModelForCausalLM.from_config(config, **kwargs)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head may be tied
        raise ModelError(
            f"GGUF '{gguf_file}' does not fit its config: missing={missing} unexpected={unexpected}"
        )
    plain.generation_config = loaded.generation_config
    # Recorded by peft as the adapter's base: the .gguf file itself, which resolve_model accepts
    # (the directory alone is ambiguous when it holds several GGUF files)
    plain.name_or_path = plain.config.name_or_path = str(Path(path) / gguf_file)
    return plain


def _load_base(
    resolved: ResolvedModel,
    cfg: ModelConfig,
    device: torch.device,
    quantize: bool,
    head: str = "lm",
) -> PreTrainedModel:
    dtype = pick_dtype(cfg.dtype, device)
    path = _local_path(resolved)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantize:
        _require_bitsandbytes()
        if resolved.gguf_file:
            raise ModelError(
                "QLoRA cannot start from a GGUF file (transformers cannot re-quantize one)",
                where="lora.qlora",
                hint="export it to a model directory first (alignkit export), or use plain LoRA",
            )
        kwargs["quantization_config"] = _nf4_config(dtype)
        # 4-bit weights are quantized as they are placed, so they must be loaded on the device
        kwargs["device_map"] = {"": device}
    with _load_errors(resolved):
        if head == "reward":
            # One scalar output: transformers' `score` head, new (random) on a causal LM
            if resolved.gguf_file:
                raise ModelError(
                    "a reward model cannot start from a GGUF file",
                    where="model.name",
                    hint="export it to a model directory first (alignkit export)",
                )
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        elif resolved.gguf_file:
            model = _load_gguf(path, resolved.gguf_file, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantize and model.device != device:
        model.to(device)
    return model


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing gets gradients through frozen inputs, so no
    # enable_input_require_grads hook is needed for LoRA. transformers 5.24 renamed the method.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(
    cfg: ModelConfig,
    lora: LoraConfig,
    *,
    device: torch.device | str = "cpu",
    for_training: bool = True,
    gradient_checkpointing: bool = False,
    head: str = "lm",
) -> PreTrainedModel:
    """Load the model ready to train.

    ``head="reward"`` loads a sequence-classification model with one output (a reward model:
    the LM head replaced by a scalar ``score`` head); its LoRA adapter keeps that head trainable.

    - LoRA disabled: full fine-tuning, every parameter trainable.
    - ``lora.enabled``: base frozen, a peft LoRA adapter trainable (a ``PeftModel``).
    - ``lora.qlora``: base in 4-bit NF4 with double quantization, prepared with peft's
      ``prepare_model_for_kbit_training`` (norms and embeddings upcast to fp32), then LoRA.
    - ``for_training=False``: an eval-mode, frozen model without LoRA (reference, inference);
      with ``lora.qlora`` the base is still loaded in 4-bit.

    For training, gated SiLU MLPs keep two activations instead of three for the backward
    (:mod:`alignkit.ops.swiglu`).
    """
    device = torch.device(device)
    if lora.qlora and not lora.enabled:
        raise ConfigError(
            "lora.qlora needs lora.enabled: QLoRA trains a LoRA adapter on a 4-bit base",
            where="lora.qlora",
            hint="set lora.enabled=true, or lora.qlora=false for full fine-tuning",
        )
    resolved = resolve_model(cfg.name, cfg.gguf_file)
    if read_adapter_config(resolved) is not None:
        raise ModelError(
            f"'{resolved.path}' is a LoRA adapter, not a full model",
            where="model.name",
            hint="merge it into its base first (alignkit export), then train from the result",
        )
    model = _load_base(resolved, cfg, device, quantize=lora.qlora, head=head)
    if not for_training:
        model.requires_grad_(False)
        return model.eval()
    use_lean_swiglu(model)  # a third less MLP activation memory, the same values
    if lora.qlora:
        from peft import prepare_model_for_kbit_training

        # peft would enable checkpointing through the deprecated API; done below when asked
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    if lora.enabled:
        model = apply_lora(model, lora, "SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    else:
        model.requires_grad_(True)
    model.train()
    return model


# --------------------------------------------------------------------------- inference


def read_adapter_config(resolved: ResolvedModel) -> dict[str, Any] | None:
    """The parsed adapter_config.json of a local peft adapter directory, else None."""
    if resolved.kind != "dir":
        return None
    path = Path(resolved.path) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", where=str(path)) from None


def adapter_base(adapter_dir: str, adapter_cfg: dict[str, Any]) -> str:
    """The base model an adapter was trained on, as a name resolve_model accepts."""
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(
            "the adapter does not name its base model (base_model_name_or_path)",
            where=str(Path(adapter_dir) / ADAPTER_CONFIG),
            hint="set base_model_name_or_path to the base model's directory or hub id",
        )
    # A built-in alias is stored as its cache directory; if that cache was cleared (or the
    # adapter was copied to another machine), the alias rebuilds it.
    if not Path(base).exists() and Path(base).name in ALIASES:
        return Path(base).name
    return base


def has_tokenizer(directory: str) -> bool:
    """Whether `directory` holds a saved tokenizer."""
    return any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES)


def adapter_tokenizer(adapter_dir: str, base_cfg: ModelConfig) -> Any:
    """The tokenizer saved beside an adapter (with a pad token, right padding), else its base's."""
    if has_tokenizer(adapter_dir):
        return _prepare_tokenizer(_tokenizer_from(adapter_dir, None, False), None)
    return load_tokenizer(base_cfg)


def load_adapter(
    adapter_dir: str,
    adapter_cfg: dict,
    device: torch.device | str = "cpu",
    *,
    dtype: str = "auto",
    head: str = "lm",
) -> LoadedModel:
    """A peft adapter on its base, not merged, frozen and in eval mode, with its tokenizer.

    The base is loaded in full precision (never 4-bit, even for a QLoRA adapter). `head` is
    `load_model`'s: "reward" for a reward model's adapter.
    """
    from peft import PeftModel

    base_cfg = ModelConfig(name=adapter_base(adapter_dir, adapter_cfg), dtype=dtype)
    base = load_model(base_cfg, LoraConfig(), device=device, for_training=False, head=head)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelError(
            f"could not load the adapter in '{adapter_dir}': {_first_line(exc)}",
            hint="check that the adapter was trained on the base named in its "
            f"{ADAPTER_CONFIG} ({base_cfg.name})",
        ) from exc
    model.requires_grad_(False)
    return LoadedModel(model.eval(), adapter_tokenizer(adapter_dir, base_cfg))


def load_for_inference(
    name_or_dir: str, device: torch.device | str = "cpu", *, dtype: str = "auto"
) -> LoadedModel:
    """An eval-mode model and its tokenizer, from a full model or a peft adapter directory.

    An adapter is loaded onto its base in full precision and merged, so generation pays no
    adapter overhead.
    """
    resolved = resolve_model(name_or_dir)
    adapter_cfg = read_adapter_config(resolved)
    if adapter_cfg is None:
        cfg = ModelConfig(name=name_or_dir, dtype=dtype)
        model = load_model(cfg, LoraConfig(), device=device, for_training=False)
        return LoadedModel(model, load_tokenizer(cfg))
    adapter_dir = str(Path(resolved.path).resolve())
    loaded = load_adapter(adapter_dir, adapter_cfg, device, dtype=dtype)
    return LoadedModel(merge_lora(loaded.model).eval(), loaded.tokenizer)
