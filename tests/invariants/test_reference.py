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
    plain = setup_for(pairs(), shared=False)
    plain.info["layout"] = "plain"
    for setup in (setup_for(pairs()), setup_for(pairs()), setup_for(pairs(seed=1)), plain):
        attach_reference(cfg, setup, policy, LogpsModel(policy), Accelerator(cpu=True), logs.append)
    files = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    # The same data twice hits the cache; other data, or another layout, makes a new entry.
    assert len(files) == 3
    assert sum("read from" in m for m in logs) == 1


def plain_logps(model, prompt: list[int], response: list[int]) -> float:
    """Full-logits forward of one unpadded row, summed over the response tokens."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    start = len(prompt) - 1  # the position predicting the first response token
    return logp[start:].gather(1, ids[0, 1:][start:, None]).sum().item()


def kto_setup(items, packed: bool = True):
    from alignkit.train.kto import KTOMethod, kto_ref_logps

    method = KTOMethod({"beta": 0.1}, pad_id=2, max_length=64, packed=packed)
    indexed = [Indexed("train", i, it) for i, it in enumerate(items)]
    lengths = [len(it.example.prompt_ids) + len(it.example.completion_ids) for it in items]
    return MethodSetup(
        method, indexed, [], lengths, wrap=LogpsModel, needs_reference=True,
        ref_logps=kto_ref_logps,
    )  # fmt: skip


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("mode", ["cache", "adapter"])
def test_kto_reference_and_loss_match_plain_rows(
    mode, packed, tmp_path, monkeypatch, tiny_model_dir
):
    """KTO's matched and mismatched (KL) rows, packed (the reference's prefix-shared blocks too)
    or padded: the reference gives the base model's log-probs of both kinds, and the step's loss
    is KTO of plain unpadded forwards."""
    from accelerate import Accelerator

    from alignkit.data.preference import KTOExample
    from alignkit.losses import KTOLogps, kto, kto_kl_estimate
    from alignkit.train.kto import with_mismatched

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    examples = [
        KTOExample(p.prompt_ids, p.chosen_ids if i % 2 else p.rejected_ids, bool(i % 2))
        for i, p in enumerate(pairs())
    ]
    items = with_mismatched(examples, seed=0)
    base = make_tiny_model(seed=0)
    rows = [(it.example.prompt_ids, it.example.completion_ids) for it in items]
    rows += [(it.example.prompt_ids, it.kl_completion_ids) for it in items]
    expected_ref = torch.tensor([plain_logps(base, p, r) for p, r in rows])  # (2B,)

    policy = lora_policy()
    setup = kto_setup(items, packed)
    assert ("ref_input_ids" in setup.method.collate(setup.train)) == packed
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "method=kto",
            f"model.name={tiny_model_dir}",
            "lora.enabled=true",
            f"reference.mode={mode}",
        ],
    )
    used = attach_reference(
        cfg, setup, policy, LogpsModel(policy), Accelerator(cpu=True), lambda m: None
    )
    assert used == mode
    batch = setup.method.collate(setup.train)
    torch.testing.assert_close(setup.method.reference(batch), expected_ref, atol=1e-4, rtol=1e-5)

    out = setup.method.step(LogpsModel(policy), batch)
    with torch.no_grad():
        pol = torch.tensor([plain_logps(policy, p, r) for p, r in rows])  # (2B,)
    b = len(items)
    assert (pol - expected_ref).abs().max() > 1e-2  # the policy differs from the reference
    desirable = torch.tensor([it.example.desirable for it in items])
    z0 = kto_kl_estimate(pol[b:], expected_ref[b:])
    assert z0 > 1e-2  # not clamped to 0: a KL estimate from the wrong rows would show
    torch.testing.assert_close(out.metrics["kl"], z0.expand(b), atol=1e-4, rtol=1e-4)
    want = kto(KTOLogps(pol[:b], expected_ref[:b], desirable, z0), beta=0.1).losses.sum()
    torch.testing.assert_close(out.loss_sum.detach(), want, atol=1e-4, rtol=1e-4)
    assert out.loss_sum.requires_grad
