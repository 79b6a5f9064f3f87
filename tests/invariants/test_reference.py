"""Every reference source gives the reference model's own log-probs.

The policy is a LoRA model whose adapter has been moved away from zero, so "adapter on" and
"adapter off" differ; each source must match a plain full-logits forward of the base model.
"""

import pytest
import torch

from alignkit.config import LoraConfig, load_config
from alignkit.data.preference import PairExample
from alignkit.models.lora import apply_lora
from alignkit.train.forward import LogpsModel
from alignkit.train.methods import MethodSetup
from alignkit.train.preference import Indexed, PairMethod, segment_logps
from alignkit.train.reference import attach_reference
from tests.conftest import make_tiny_model


def pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, 900, (k,), generator=g).tolist()

    return [PairExample(ids(4 + i), ids(3 + i % 3), ids(5 - i % 2)) for i in range(n)]


def plain_reference_logps(model, ex: PairExample) -> tuple[float, float]:
    """Full-logits forward of the reference over prompt+response, summed over the response."""
    out = []
    for resp in (ex.chosen_ids, ex.rejected_ids):
        ids = torch.tensor([ex.prompt_ids + resp])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        start = len(ex.prompt_ids) - 1  # the position predicting the first response token
        out.append(logp[start:].gather(1, tgt[start:, None]).sum().item())
    return tuple(out)


def lora_policy():
    torch.manual_seed(4)
    model = apply_lora(make_tiny_model(seed=0), LoraConfig(enabled=True, r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapter-on now differs from the base
    return model


def setup_for(examples, shared=True):
    method = PairMethod("dpo", {"beta": 0.1}, pad_id=2, shared=shared)
    items = [Indexed("train", i, ex) for i, ex in enumerate(examples)]
    return MethodSetup(
        method,
        items,
        [],
        [len(e) for e in examples],
        wrap=LogpsModel,
        needs_reference=True,
        ref_logps=lambda m, b: segment_logps(m, b, 2 * len(b["index"]))[0],
    )


@pytest.mark.parametrize("mode", ["cache", "adapter", "copy"])
def test_reference_sources_match_plain_forward(mode, tmp_path, monkeypatch, tiny_model_dir):
    from accelerate import Accelerator

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    examples = pairs()
    base = make_tiny_model(seed=0)  # same weights as the policy's base and as tiny_model_dir
    expected = torch.tensor([plain_reference_logps(base, ex) for ex in examples])  # (n, 2)

    policy = lora_policy()
    setup = setup_for(examples)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "method=dpo",
        f"model.name={tiny_model_dir}",
        "lora.enabled=true",
        f"reference.mode={mode}",
    ]
    if mode == "copy":
        overrides.append(f"reference.model={tiny_model_dir}")
    cfg = load_config(None, overrides)
    logs = []
    used = attach_reference(
        cfg, setup, policy, LogpsModel(policy), Accelerator(cpu=True), logs.append
    )
    assert used == mode and any("reference" in m for m in logs)
    batch = setup.method.collate(setup.train)
    got = setup.method.reference(batch).view(2, -1).T  # (n, 2): chosen, rejected
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-5)
    # The policy itself differs from the reference (else the test could not fail).
    with torch.no_grad():
        on = segment_logps(LogpsModel(policy), batch, 2 * len(examples))[0].view(2, -1).T
    assert (on - expected).abs().max() > 1e-2


def test_cache_is_reused_and_keyed_by_data(tmp_path, monkeypatch, tiny_model_dir):
    from accelerate import Accelerator

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'r'}",
            "method=dpo",
            f"model.name={tiny_model_dir}",
            "lora.enabled=true",
        ],
    )
    policy = lora_policy()
    logs = []
    for examples in (pairs(), pairs(), pairs(seed=1)):
        attach_reference(
            cfg, setup_for(examples), policy, LogpsModel(policy), Accelerator(cpu=True), logs.append
        )
    files = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(files) == 2  # the same data twice hits the cache; other data makes a new entry
    assert sum("read from" in m for m in logs) == 1
