"""Evaluating a LoRA adapter: its reference is the base with the adapter disabled (one copy in
memory), and that must give exactly what loading the base on its own gives."""

from pathlib import Path

import pytest
import torch

from alignkit.config import LoraConfig, ModelConfig
from alignkit.data.preference import PairExample
from alignkit.eval.loading import load_eval_models
from alignkit.eval.preference import pair_scores
from alignkit.models import load_for_inference, load_model, save_final
from alignkit.models.lora import apply_lora
from alignkit.train.forward import LogpsModel


def pairs():
    g = torch.Generator().manual_seed(7)

    def ids(k):
        return torch.randint(3, 900, (k,), generator=g).tolist()

    return [PairExample(ids(4 + i), ids(3 + i % 2), ids(5 - i % 3)) for i in range(4)]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    """A LoRA adapter on the tiny base, moved away from zero so adapter on and off differ."""
    base = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), for_training=False)
    torch.manual_seed(5)
    peft = apply_lora(base, LoraConfig(enabled=True, r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return str(save_final(peft, tokenizer, tmp_path_factory.mktemp("adapter")))


def scores(module):
    return pair_scores(LogpsModel(module), pairs(), pad_id=2, batch_size=2).logps


def test_adapter_disabled_reference_equals_the_base_loaded_alone(adapter_dir, tiny_model_dir):
    models = load_eval_models(adapter_dir, None, "cpu")
    assert models.adapter_reference and models.reference_model is None  # no second copy
    assert Path(models.reference_name).resolve() == Path(tiny_model_dir).resolve()
    with models.use("reference") as ref:
        via_adapter_off = scores(ref)
    base, _ = load_for_inference(tiny_model_dir, "cpu")
    assert torch.allclose(via_adapter_off, scores(base), atol=1e-5)
    # and the model side is the adapter applied: what the merged adapter gives, not the base
    with models.use("model") as policy:
        via_adapter_on = scores(policy)
    merged, _ = load_for_inference(adapter_dir, "cpu")
    assert torch.allclose(via_adapter_on, scores(merged), atol=1e-4)
    assert not torch.allclose(via_adapter_on, via_adapter_off, atol=1e-3)


def test_an_explicit_reference_replaces_the_adapter_disabled_one(adapter_dir, tiny_model_dir):
    models = load_eval_models(adapter_dir, tiny_model_dir, "cpu")
    assert not models.adapter_reference and models.reference_model is not None
    with models.use("reference") as ref:
        explicit = scores(ref)
    with models.use("model") as policy:
        assert not torch.allclose(scores(policy), explicit, atol=1e-3)
    base, _ = load_for_inference(tiny_model_dir, "cpu")
    assert torch.allclose(explicit, scores(base), atol=1e-5)
