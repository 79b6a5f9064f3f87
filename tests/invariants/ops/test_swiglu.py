"""The lean gated-MLP product: the same values and gradients as ``silu(gate) * up`` written
plainly, with one (tokens, intermediate) activation fewer kept per layer for the backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from alignkit.ops.swiglu import _lean_forward, swiglu, use_lean_swiglu


def test_swiglu_values_and_gradients():
    gate = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up)
    only_up = swiglu(gate.detach(), up)  # a frozen gate: no gradient asked for it
    only_up.sum().backward()
    torch.testing.assert_close(up.grad, F.silu(gate.detach()))


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


def test_lean_mlp_keeps_one_activation_fewer_and_trains_the_same():
    plain, lean = make_tiny_model(seed=3), make_tiny_model(seed=3)
    plain.train(), lean.train()
    layers = lean.config.num_hidden_layers
    assert use_lean_swiglu(lean) == layers
    ids = torch.randint(3, 500, (2, 11))
    grads = []
    for model in (plain, lean):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert torch.isfinite(loss)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)
    one = 2 * 11 * lean.config.intermediate_size * 4  # one (tokens, intermediate) fp32 tensor
    assert saved_bytes(plain, ids) - saved_bytes(lean, ids) == layers * one


def test_training_models_get_the_lean_mlp(tiny_model_dir):
    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models.load import load_model

    for lora in (LoraConfig(enabled=True, r=4), LoraConfig(enabled=False)):
        model = load_model(ModelConfig(name=tiny_model_dir), lora)
        mlps = [m for m in model.modules() if hasattr(m, "gate_proj")]
        assert mlps and all(m.forward.__func__ is _lean_forward for m in mlps)
    frozen = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), for_training=False)
    assert not any(getattr(m.forward, "__func__", None) is _lean_forward for m in frozen.modules())
