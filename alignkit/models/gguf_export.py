"""Export a model as a GGUF file that llama.cpp and Ollama run, with an Ollama Modelfile beside it.

The file is written with gguf-py's ``GGUFWriter``, following llama.cpp's own converter
(``convert_hf_to_gguf.py``) for the Llama architecture: the same metadata keys, tensor names from
``gguf.TensorNameMap``, the Q/K row permutation, a byte-level BPE ("gpt2") vocabulary with merges
and token types, the special token ids and the chat template.

Quantizations:

- ``f16``: matrices in float16; norms stay float32 (llama.cpp reads 1-D tensors as f32).
- ``q8_0``: matrices quantized by ``gguf.quants`` (Q8_0 blocks of 32), norms float32.
- ``q4_k_m``: gguf-py 0.19 can read Q4_K but not write it, so the model is written in float32 and
  quantized by llama.cpp itself (``llama_model_quantize``, the code behind ``llama-quantize``)
  through llama-cpp-python; without that package this quant is refused with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from alignkit.errors import ConfigError, ModelError

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class Quant(NamedTuple):
    file_type: LlamaFileType  # general.file_type of the finished file
    matrix_type: QType  # how gguf-py writes 2-D weights
    llama_cpp_ftype: str | None  # llama.cpp's LLAMA_FTYPE_* when llama.cpp quantizes afterwards


QUANTS: dict[str, Quant] = {
    "f16": Quant(LlamaFileType.MOSTLY_F16, QType.F16, None),
    "q8_0": Quant(LlamaFileType.MOSTLY_Q8_0, QType.Q8_0, None),
    # Written as f32 first so llama.cpp's quantizer rounds once, from the exact weights
    "q4_k_m": Quant(LlamaFileType.MOSTLY_Q4_K_M, QType.F32, "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
}


class LlamaParams(NamedTuple):
    """The hyperparameters llama.cpp's ``llama`` architecture reads, from an HF config.json."""

    name: str
    vocab_size: int
    context_length: int
    hidden: int
    n_layers: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tied: bool


class GgufExport(NamedTuple):
    gguf_path: Path
    modelfile_path: Path
    quant: str
    chat_template: bool  # the chat template is in the file
    ollama_template: bool  # the Modelfile carries a TEMPLATE (chatml recognised)
    tensor_types: dict[str, int]  # GGML type name -> tensor count, as read back from the file


def check_quant(quant: str) -> Quant:
    """The spec of ``quant``; an error naming what this installation can write otherwise."""
    spec = QUANTS.get(quant)
    available = supported_quants()
    if spec is None:
        raise ConfigError(
            f"unknown GGUF quantization '{quant}'",
            where="--quant",
            hint=f"use one of: {', '.join(available)}",
        )
    if quant not in available:
        raise ConfigError(
            f"--quant {quant} needs llama.cpp's quantizer: gguf-py writes f16 and q8_0 but has no "
            "Q4_K encoder, and llama-cpp-python (which carries llama.cpp's) is not installed",
            where="--quant",
            hint=f"pip install 'alignkit[gguf-quant]' (llama-cpp-python), or use one of: "
            f"{', '.join(available)}",
        )
    return spec


def supported_quants() -> list[str]:
    """Quants this installation can write: gguf-py's own, plus llama.cpp's when importable."""
    import importlib.util

    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    return [name for name, q in QUANTS.items() if q.llama_cpp_ftype is None or has_llama_cpp]


def llama_params(model_dir: Path) -> LlamaParams:
    """Read config.json and refuse what the ``llama`` GGUF architecture cannot express."""
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or [config.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports Llama-architecture models only; '{model_dir}' is {archs[0]}",
            hint=f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM, "
            "Llama 3 style); export a merged model with `alignkit export` without --gguf and "
            "convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(
            f"rope scaling '{rope.get('rope_type') or rope.get('type')}' is not supported by "
            "GGUF export",
            where=str(model_dir / "config.json"),
            hint="only the default rope is written; use llama.cpp's convert_hf_to_gguf.py",
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ModelError(
            "GGUF export does not write attention or MLP biases",
            where=str(model_dir / "config.json"),
            hint="use llama.cpp's convert_hf_to_gguf.py for this model",
        )
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    return LlamaParams(
        name=model_dir.name,
        vocab_size=config["vocab_size"],
        context_length=config.get("max_position_embeddings", 2048),
        hidden=hidden,
        n_layers=config["num_hidden_layers"],
        ffn=config["intermediate_size"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or hidden // n_head,
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half rope layout to llama.cpp's interleaved one.

    ``w``: (n_head * head_dim, in). HF pairs dimension i with i + head_dim/2 inside each head;
    llama.cpp's ``llama`` rope pairs 2i with 2i+1. Same as llama.cpp's converter: per head,
    (2, head_dim/2) -> (head_dim/2, 2).
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every weight in the directory's safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"'{model_dir}' holds no .safetensors weights", hint="re-save the model")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                # via torch: numpy has no bfloat16
                yield key, f.get_tensor(key).to(torch.float32).numpy()


def _encode(w: np.ndarray, matrix_type: QType) -> tuple[np.ndarray, QType]:
    """The bytes (or array) to store and their GGML type, as llama.cpp's converter chooses.

    1-D tensors (norms) stay f32. A matrix whose rows do not split into whole quant blocks falls
    back to f16, since a block never spans two rows.
    """
    if w.ndim == 1 or matrix_type == QType.F32:
        return w.astype(np.float32), QType.F32
    if matrix_type == QType.F16:
        return w.astype(np.float16), QType.F16
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    if w.shape[-1] % block:
        return w.astype(np.float16), QType.F16
    return gguf.quants.quantize(w, matrix_type), matrix_type


def add_tensors(writer: gguf.GGUFWriter, model_dir: Path, p: LlamaParams, mtype: QType) -> int:
    """Add every weight under its llama.cpp name; returns how many tensors were written."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, p.n_layers)
    count = 0
    for hf_name, w in _hf_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        mapped = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ModelError(f"GGUF export cannot place tensor '{hf_name}'", where=str(model_dir))
        kind, name = mapped
        if kind == gguf.MODEL_TENSOR.OUTPUT and p.tied:
            continue  # tied: llama.cpp uses token_embd when output.weight is absent
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            w = permute_qk(w, p.n_head)
        elif kind == gguf.MODEL_TENSOR.ATTN_K:
            w = permute_qk(w, p.n_head_kv)
        data, qtype = _encode(w, mtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        count += 1
    return count


def add_hparams(writer: gguf.GGUFWriter, p: LlamaParams, file_type: LlamaFileType) -> None:
    writer.add_name(p.name)
    writer.add_vocab_size(p.vocab_size)
    writer.add_context_length(p.context_length)
    writer.add_embedding_length(p.hidden)
    writer.add_block_count(p.n_layers)
    writer.add_feed_forward_length(p.ffn)
    writer.add_head_count(p.n_head)
    writer.add_head_count_kv(p.n_head_kv)
    writer.add_rope_dimension_count(p.head_dim)
    if p.head_dim != p.hidden // p.n_head:
        writer.add_key_length(p.head_dim)
        writer.add_value_length(p.head_dim)
    writer.add_rope_freq_base(p.rope_theta)
    writer.add_layer_norm_rms_eps(p.rms_eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's names for the byte-level BPE pre-tokenizers recognised here, keyed by the steps of
# tokenizer.json's pre_tokenizer. llama.cpp splits text with its own regex per name, so a name
# that does not match the tokenizer would silently tokenize differently: unknown ones are refused.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel+regex",): "gpt-2",
    ("Digits(individual)", "ByteLevel+regex"): "smollm",
    (f"Split({_LLAMA3_SPLIT})", "ByteLevel"): "llama-bpe",
}


def _step_signature(step: dict[str, Any]) -> str:
    kind = step.get("type", "?")
    if kind == "ByteLevel":
        return "ByteLevel+regex" if step.get("use_regex", True) else "ByteLevel"
    if kind == "Digits":
        return "Digits(individual)" if step.get("individual_digits") else "Digits"
    if kind == "Split":
        return f"Split({(step.get('pattern') or {}).get('Regex', '?')})"
    return kind


def pre_tokenizer_name(model_dir: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the directory's tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            f"'{model_dir}' has no tokenizer.json (a fast tokenizer is needed for GGUF export)",
            hint="save the tokenizer with save_pretrained from a fast (tokenizers) tokenizer",
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "sentencepiece-style BPE" if model.get("byte_fallback") else model.get("type")
        raise ModelError(
            "GGUF export writes byte-level BPE (gpt2-style) vocabularies only; this tokenizer "
            f"is {kind}",
            where=str(path),
            hint="use llama.cpp's convert_hf_to_gguf.py for sentencepiece-style tokenizers",
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    signature = tuple(_step_signature(s) for s in steps)
    if signature not in PRE_TOKENIZERS:
        raise ModelError(
            f"GGUF export does not know llama.cpp's name for the pre-tokenizer {signature}",
            where=str(path),
            hint="known: gpt-2, smollm (StarCoder digits), llama-bpe (Llama 3); use llama.cpp's "
            "convert_hf_to_gguf.py, which identifies more",
        )
    return PRE_TOKENIZERS[signature]


def _looks_special(token: str) -> bool:
    # Same rule as llama.cpp's converter: <|...|> and <...> added tokens are control tokens
    return bool(re.fullmatch(r"<\|.*\|>|<[^<>\s]+>", token))


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens (byte-level strings as in tokenizer.json) and their llama.cpp token types.

    ``vocab_size`` is the embedding's row count; ids the tokenizer lacks become ``[PADi]``
    placeholders of type UNUSED, as llama.cpp's converter writes them.
    """
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(
            f"the tokenizer has ids up to {max(by_id)} but the model's embedding has "
            f"{vocab_size} rows",
            hint="resize the model's embeddings to the tokenizer (resize_token_embeddings)",
        )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].special or _looks_special(token)
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_token(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the HF tokenizer puts ``token_id`` at the start (``first``) or end of a text."""
    if token_id is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return len(full) > len(plain) and full[0 if first else -1] == token_id


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, tokenizer: Any, p: LlamaParams) -> None:
    """Tokenizer model, tokens, types, merges, special ids, add-bos/eos and chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(model_dir))
    tokens, types = vocab_tokens(tokenizer, p.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges and special ids the way llama.cpp's converter reads them (tokenizer.json,
    # tokenizer_config.json, config.json); what the tokenizer object does is authoritative for
    # adding bos/eos and for the template, which training may have set from the run config.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=p.vocab_size)
    special.add_special_token["bos"] = _adds_token(tokenizer, tokenizer.bos_token_id, True)
    special.add_special_token["eos"] = _adds_token(tokenizer, tokenizer.eos_token_id, False)
    special.chat_template = tokenizer.chat_template or special.chat_template
    if tokenizer.eos_token_id is not None:
        # The tokenizer's eos is the end-of-turn token generation stops on (<|im_end|> for
        # chatml), which config.json's eos_token_id may not be.
        special.special_token_ids["eos"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)


# Ollama's Go-template form of chatml: every turn closed by <|im_end|>, then an open assistant
# turn when the conversation does not already end with one.
OLLAMA_CHATML = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def _chatml_default_system(tokenizer: Any) -> str | None | bool:
    """False when the template is not chatml; else its default system message (None if none).

    Judged by rendering, not by reading the Jinja source: a template is chatml when it renders a
    system/user/assistant conversation exactly as chatml does.
    """
    if not tokenizer.chat_template:
        return False
    turns = [("system", "S"), ("user", "U"), ("assistant", "A")]
    chat = [{"role": r, "content": c} for r, c in turns]
    expected = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)
    try:
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        user_only = tokenizer.apply_chat_template(
            chat[1:2], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - any template failure just means "not chatml"
        return False
    tail = "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    if full != expected or not user_only.endswith(tail):
        return False
    head = user_only[: -len(tail)]  # a system turn the template adds when none is given
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S)
    return match.group(1) if match else None


def modelfile_text(tokenizer: Any, gguf_name: str = GGUF_NAME) -> tuple[str, bool]:
    """The Ollama Modelfile, and whether it carries a TEMPLATE (only for chatml templates).

    For other templates Ollama picks one from the GGUF's tokenizer.chat_template itself.
    """
    lines = [f"FROM ./{gguf_name}"]
    system = _chatml_default_system(tokenizer)
    if system is not False:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n", system is not False


def write_gguf(model_dir: Path, path: Path, quant: str) -> int:
    """Write the GGUF for a full HF model directory; returns the tensor count.

    For llama.cpp quants the model is written in f32 beside ``path`` and quantized into it.
    """
    from transformers import AutoTokenizer

    spec = check_quant(quant)
    params = llama_params(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    target = path.with_suffix(".f32.tmp") if spec.llama_cpp_ftype else path
    file_type = LlamaFileType.ALL_F32 if spec.llama_cpp_ftype else spec.file_type
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_hparams(writer, params, file_type)
        add_vocab(writer, model_dir, tokenizer, params)
        count = add_tensors(writer, model_dir, params, spec.matrix_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    if spec.llama_cpp_ftype:
        try:
            llama_cpp_quantize(target, path, spec.llama_cpp_ftype)
        finally:
            target.unlink(missing_ok=True)
    return count


def llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> None:
    """Quantize a GGUF with llama.cpp's ``llama_model_quantize`` (``llama-quantize``'s code)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = max(1, (os.cpu_count() or 1))
    with _native_stderr_to(dst.with_suffix(".log")) as log:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    log.unlink(missing_ok=True)
    if rc != 0:
        raise ModelError(
            f"llama.cpp could not quantize '{src}' ({ftype}, status {rc})",
            hint="llama.cpp said: " + " | ".join(tail) if tail else None,
        )


@contextlib.contextmanager
def _native_stderr_to(path: Path) -> Iterator[Path]:
    """Send what native code writes to file descriptor 2 into ``path`` for the duration.

    llama.cpp's quantizer prints one line per tensor that falls back to another type (most of
    them on models whose width is not a multiple of 256); the command summarises the written
    types instead, and the log is shown only when quantizing fails.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
            yield path
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _has_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".gguf"
    return any((path / f).is_file() for f in ("config.json", "adapter_config.json")) or any(
        path.glob("*.gguf")
    )


def _is_full_hf_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and not (path / "adapter_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def export_gguf(source: str | Path, out_dir: str | Path, quant: str = "f16") -> GgufExport:
    """Write ``out_dir/model.gguf`` and ``out_dir/Modelfile`` for ``source``.

    ``source``: a full HF model directory (read as it is), or anything else
    :func:`export_merged` accepts (a LoRA adapter directory is merged into its base, an alias or
    a GGUF is de-quantized), which is first written to a temporary directory in fp32.
    """
    from transformers import AutoTokenizer

    from alignkit.models.export import export_merged
    from alignkit.models.resolve import ALIASES

    check_quant(quant)  # before any loading: a typo should cost nothing
    src, out = Path(source).expanduser(), Path(out_dir)
    if str(source) not in ALIASES and src.exists() and not _has_model(src):
        raise ModelError(
            f"'{src}' holds no model (no config.json, adapter_config.json or .gguf)",
            hint="pass a run directory that finished (its final/), an adapter or model "
            "directory, or a .gguf file",
        )
    if _is_full_hf_dir(src):
        llama_params(src)  # refuse an unsupported model before creating anything
    out.mkdir(parents=True, exist_ok=True)
    path = out / GGUF_NAME
    with tempfile.TemporaryDirectory(dir=out, prefix=".merge-") as tmp:
        model_dir = src if _is_full_hf_dir(src) else export_merged(str(source), tmp, "fp32")
        partial = path.with_suffix(".partial")
        write_gguf(Path(model_dir), partial, quant)
        partial.replace(path)  # never leave a half-written model.gguf behind
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text, templated = modelfile_text(tokenizer)
    modelfile = out / MODELFILE
    modelfile.write_text(text, encoding="utf-8")
    return GgufExport(
        path, modelfile, quant, bool(tokenizer.chat_template), templated, tensor_types(path)
    )


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, most common first.

    Quant names promise less than they say: a matrix whose rows do not split into whole blocks
    (256 for the K-quants) is stored in another type, and this shows how many were.
    """
    from collections import Counter

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return dict(counts.most_common())
