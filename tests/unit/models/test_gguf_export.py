"""GGUF export on the tiny random Llama from conftest (hidden 32, 4 heads, 2 kv heads, 2 layers).

The file is read back with gguf-py's reader (metadata, tensor names and types, tokenizer fields)
and run by llama.cpp, whose logits must match transformers' on the same tokens: that is what
catches a wrong Q/K permutation or tensor layout, which metadata checks cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.errors import ConfigError, ModelError
from alignkit.models.gguf_export import (
    check_quant,
    export_gguf,
    modelfile_text,
    permute_qk,
    supported_quants,
)

gguf = pytest.importorskip("gguf")

TINY_TENSORS = 2 + 2 * 9  # token_embd, output_norm; per block: 2 norms, q k v o, gate up down


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny_f16(tiny_model_dir, tmp_path_factory) -> Path:
    return export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf-f16"), "f16").gguf_path


def llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)


def test_permute_qk_interleaves_each_heads_halves():
    # One head of dim 4: HF rotates (0, 2) and (1, 3) together, llama.cpp (0, 1) and (2, 3)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)  # (head_dim, in)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 2, 6]
    two_heads = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(two_heads, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_metadata_tensors_and_tokenizer(tiny_f16, tokenizer):
    reader = gguf.GGUFReader(tiny_f16)
    assert field(reader, "general.architecture") == "llama"
    expected = {
        "llama.block_count": 2,
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 512,
        "llama.vocab_size": 49152,
        "llama.rope.dimension_count": 8,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
    }
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert len(reader.tensors) == TINY_TENSORS
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp falls back to token_embd
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    # tokenizer: byte-level BPE with merges, the chat template and chatml's special tokens
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert field(reader, "tokenizer.ggml.eos_token_id") == im_end
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 40_000
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[im_end] == gguf.TokenType.CONTROL
    assert token_types[1000] == gguf.TokenType.NORMAL


def hf_logprobs(model_dir: str, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1).numpy()


def llama_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama(path)
    try:
        llm.eval(ids)
        scores = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()
    return scores.log_softmax(-1).numpy()


@pytest.mark.parametrize("quant,tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_llama_cpp_runs_it_like_transformers(tiny_model_dir, tokenizer, tmp_path, quant, tol):
    path = export_gguf(tiny_model_dir, tmp_path, quant).gguf_path
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = llama(path)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
    # measured on this random model: max |d| 4.3e-4 (f16), 1.0e-2 (q8_0); bounds keep 3x margin
    diff = np.abs(llama_logprobs(path, ids) - hf_logprobs(tiny_model_dir, ids))
    assert diff.max() < tol, f"{quant}: max |log-prob difference| {diff.max():.2e}"


def test_q8_0_quantizes_matrices(tiny_model_dir, tmp_path):
    reader = gguf.GGUFReader(export_gguf(tiny_model_dir, tmp_path, "q8_0").gguf_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_modelfile_is_chatml_with_stop_and_default_system(tokenizer, tiny_f16):
    text, templated = modelfile_text(tokenizer)
    assert templated
    assert text.startswith("FROM ./model.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert (tiny_f16.parent / "Modelfile").read_text() == text


def test_bad_quant_and_bad_sources(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown GGUF quantization 'q3_k'") as exc:
        check_quant("q3_k")
    assert "f16, q8_0" in str(exc.value)
    assert supported_quants()[:2] == ["f16", "q8_0"]
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds no model"):
        export_gguf(empty, tmp_path / "out")
    other = tmp_path / "qwen"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="Llama-architecture models only.*Qwen2ForCausalLM") as exc:
        export_gguf(other, tmp_path / "out")
    assert "LlamaForCausalLM" in str(exc.value)


def test_cli_errors_are_messages(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from alignkit.cli import app

    def error(*args: str) -> str:
        result = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "error:" in result.output, result.output
        return result.output

    assert "unknown GGUF quantization 'q4'" in error(tiny_model_dir, "--gguf", "--quant", "q4")
    assert "--quant applies to GGUF export only" in error(tiny_model_dir, "--quant", "q8_0")
    (tmp_path / "run").mkdir()
    assert "holds no model" in error(str(tmp_path / "run"), "--gguf")
    assert not (tmp_path / "out" / "model.gguf").exists()


def test_cli_writes_gguf_and_modelfile(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from alignkit.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", tiny_model_dir, "--gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GGUF (f16" in result.output and "Modelfile (chatml TEMPLATE)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
