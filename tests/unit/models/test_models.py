"""Model loading, LoRA/QLoRA, saving and export, on the tiny random Llama from conftest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError, ConfigError, ModelError
from alignkit.models import (
    apply_lora,
    count_parameters,
    export_merged,
    linear_module_names,
    load_for_inference,
    load_model,
    load_tokenizer,
    pick_dtype,
    save_final,
)

IDS = torch.tensor([[1, 9690, 198, 2683, 314, 253, 2], [1, 4093, 28, 905, 2, 2, 2]])
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _perturb_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """A fresh adapter has B = 0 and equals its base; give it a non-zero delta to test with."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _lora_leaf_names(model: torch.nn.Module) -> set[str]:
    return {n.split(".")[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}


# --------------------------------------------------------------------------- dtype


def test_pick_dtype_rules():
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("fp16", "cpu") == torch.float16
    assert pick_dtype("fp32", "cuda", bf16_supported=True) == torch.float32
    assert pick_dtype("auto", "cuda", bf16_supported=True) == torch.bfloat16
    assert pick_dtype("auto", "cuda:1", bf16_supported=False) == torch.float16
    assert pick_dtype("fp16", "cuda", bf16_supported=True) == torch.float16
    with pytest.raises(ModelError, match="bf16"):
        pick_dtype("bf16", "cuda", bf16_supported=False)
    with pytest.raises(ConfigError):
        pick_dtype("int3", "cpu")


# --------------------------------------------------------------------------- loading


def test_full_finetune_load(tiny_model_dir):
    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig())
    assert model.training and model.dtype == torch.float32
    counts = count_parameters(model)
    assert counts.trainable == counts.total > 0 and counts.fraction == 1.0
    # absolute, so an adapter trained on it names a base loadable from any directory
    assert Path(model.name_or_path).is_absolute()


def test_eval_load_is_frozen_and_plain(tiny_model_dir):
    model = load_model(
        ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True), for_training=False
    )
    assert not model.training
    assert count_parameters(model).trainable == 0
    assert not _lora_leaf_names(model)


def test_lora_only_adapter_trainable(tiny_model_dir):
    base_total = count_parameters(load_model(ModelConfig(name=tiny_model_dir), LoraConfig())).total
    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True, r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    counts = count_parameters(model)
    assert counts.trainable == lora_numel
    assert counts.total == base_total + lora_numel
    # all-linear covers attention and MLP projections but not the (tied) output head
    assert _lora_leaf_names(model) == LLAMA_LINEAR


def test_lora_target_list(tiny_model):
    model = apply_lora(tiny_model, LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"]))
    assert _lora_leaf_names(model) == {"q_proj", "v_proj"}


def test_bad_target_module_names_existing_ones(tiny_model):
    with pytest.raises(ModelError) as err:
        apply_lora(tiny_model, LoraConfig(enabled=True, target_modules=["q_proj", "qkv_proj"]))
    text = str(err.value)
    assert "qkv_proj" in text and "q_proj" in text and "down_proj" in text
    assert linear_module_names(tiny_model)[0] == "down_proj"


def test_lora_with_gradient_checkpointing_gets_grads(tiny_model_dir):
    # the base is frozen, so checkpointing must not cut the graph before the adapters
    model = load_model(
        ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True, r=2), gradient_checkpointing=True
    )
    assert model.get_base_model().is_activation_checkpointing
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_requires_lora(tiny_model_dir):
    with pytest.raises(ConfigError, match="lora.enabled"):
        load_model(ModelConfig(name=tiny_model_dir), LoraConfig(qlora=True))


def test_qlora_4bit_base_trains_lora_only(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True, qlora=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.get_base_model().is_loaded_in_4bit
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    out.loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    # LoRA B starts at zero, so only B receives gradient on the first step
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    counts = count_parameters(model)
    assert 0 < counts.trainable < counts.total


# --------------------------------------------------------------------------- save / export


def test_save_final_adapter_reloads_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True, r=4))
    _perturb_lora_b(model)
    expected = _logits(model)
    out = save_final(model, load_tokenizer(ModelConfig(name=tiny_model_dir)), tmp_path / "final")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    # plain transformers + peft, as a user would
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=0)
    # and alignkit's inference loader (merged adapter)
    loaded = load_for_inference(str(out))
    assert not loaded.model.training and loaded.tokenizer.pad_token is not None
    torch.testing.assert_close(_logits(loaded.model), expected, atol=1e-5, rtol=0)


def test_save_final_full_model(tiny_model_dir, tmp_path):
    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig())
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    expected = _logits(model)
    out = save_final(model, load_tokenizer(ModelConfig(name=tiny_model_dir)), tmp_path / "final")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-6, rtol=0)


def test_export_merged_matches_adapter(tiny_model_dir, tmp_path):
    model = load_model(
        ModelConfig(name=tiny_model_dir),
        LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]),
    )
    _perturb_lora_b(model, seed=1)
    expected = _logits(model)
    adapter_dir = save_final(
        model, load_tokenizer(ModelConfig(name=tiny_model_dir)), tmp_path / "final"
    )
    merged_dir = export_merged(adapter_dir, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert (merged_dir / "tokenizer_config.json").is_file()
    # a full model directory is resaved, here in bf16
    half = export_merged(merged_dir, tmp_path / "half", dtype="bf16")
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="adapter"):
        export_merged(merged_dir, adapter_dir)


# --------------------------------------------------------------------------- user errors


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope")), LoraConfig())


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(ModelConfig(name=str(tmp_path)), LoraConfig())


def test_corrupt_and_missing_weights(tiny_model_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelError, match="corrupt") as err:
        load_model(ModelConfig(name=str(corrupt)), LoraConfig())
    assert err.value.hint
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="could not load the model"):
        load_model(ModelConfig(name=str(corrupt)), LoraConfig())


def test_hub_id_without_network(monkeypatch):
    # Offline mode fails at once instead of retrying an unreachable hub for ~45 s per file
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name="no-such-org/no-such-model"), LoraConfig())
    assert "no network to the hub" in str(err.value)


def test_adapter_dir_is_not_a_training_base(tiny_model, tmp_path):
    adapter = apply_lora(tiny_model, LoraConfig(enabled=True, r=2))
    adapter.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="LoRA adapter"):
        load_model(ModelConfig(name=str(tmp_path)), LoraConfig())


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_padding_and_jinja_override(tiny_model_dir):
    template = (
        "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}"
    )
    tok = load_tokenizer(ModelConfig(name=tiny_model_dir, chat_template=template))
    assert tok.padding_side == "right" and tok.pad_token is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<<user>>hi\n<<assistant>>"
    plain = load_tokenizer(ModelConfig(name=tiny_model_dir))
    assert "<|im_start|>" in plain.chat_template  # the model's own template is kept


def test_tokenizer_template_errors(tiny_model_dir):
    with pytest.raises(AlignkitError, match="unknown chat template"):
        load_tokenizer(ModelConfig(name=tiny_model_dir, chat_template="chatmll"))
    with pytest.raises(AlignkitError, match="not valid Jinja"):
        load_tokenizer(ModelConfig(name=tiny_model_dir, chat_template="{% for x in %}"))


def test_tokenizer_named_template(tiny_model_dir):
    templates = pytest.importorskip("alignkit.data.templates")
    name, jinja = next(iter(templates.NAMED_TEMPLATES.items()))
    tok = load_tokenizer(ModelConfig(name=tiny_model_dir, chat_template=name))
    assert tok.chat_template == jinja


# bitsandbytes' CPU backend tries to fetch a hub kernel when it is imported (on CPUs with
# AVX512-BF16) and logs its failure; it is imported once per process, so each check runs in a
# fresh interpreter that records every log record.
_RECORD_LOGS = """
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.name, record.levelname, record.getMessage()])
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.DEBUG)
{body}
print(json.dumps(records))
"""


def _log_records(body: str) -> list[list[str]]:
    import subprocess
    import sys

    script = _RECORD_LOGS.format(body=body)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kernel_warnings(records: list[list[str]]) -> list[list[str]]:
    return [r for r in records if r[0].startswith("bitsandbytes") and "gemm_4bit" in r[2]]


def test_lora_load_logs_no_bitsandbytes_kernel_warning(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    if not _kernel_warnings(_log_records("import bitsandbytes")):
        pytest.skip("bitsandbytes does not try the hub kernel on this CPU (no AVX512-BF16)")
    records = _log_records(
        "from alignkit.config import LoraConfig, ModelConfig\n"
        "from alignkit.models import load_model\n"
        f"load_model(ModelConfig(name={tiny_model_dir!r}), LoraConfig(enabled=True))\n"
        "logging.getLogger('bitsandbytes.other').warning('still shown')\n"
    )
    assert _kernel_warnings(records) == []
    # only that one logger is quieted
    assert ["bitsandbytes.other", "WARNING", "still shown"] in records
