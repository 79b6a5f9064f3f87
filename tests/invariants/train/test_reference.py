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
from alignkit.train.method import Indexed, MethodSetup, segment_logps
from alignkit.train.preference import PairMethod
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
    from alignkit.train.kto import KTOMethod

    method = KTOMethod({"beta": 0.1}, pad_id=2, max_length=64, packed=packed)
    indexed = [Indexed("train", i, it) for i, it in enumerate(items)]
    lengths = [len(it.example.prompt_ids) + len(it.example.completion_ids) for it in items]
    return MethodSetup(method, indexed, [], lengths, wrap=LogpsModel)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("mode", ["cache", "adapter"])
def test_kto_reference_and_loss_match_plain_rows(
    mode, packed, tmp_path, monkeypatch, tiny_model_dir
):
    """KTO's matched and mismatched (KL) rows, packed (prompts shared by two examples run once;
    the mismatched rows continue the matched prompts; the reference's prefix-shared blocks) or
    padded: the reference gives the base model's log-probs of both kinds, and the step's loss
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
    # Two prompts with both replies: packed, each runs once for both examples.
    examples += [KTOExample(p.prompt_ids, p.rejected_ids, False) for p in pairs()[1:5:2]]
    items = with_mismatched(examples, seed=0)
    base = make_tiny_model(seed=0)
    rows = [(it.example.prompt_ids, it.example.completion_ids) for it in items]
    rows += [(it.example.prompt_ids, it.kl_completion_ids) for it in items]
    expected_ref = torch.tensor([plain_logps(base, p, r) for p, r in rows])  # (2B,)

    policy = lora_policy()
    setup = kto_setup(items, packed)
    from alignkit.train.kto import SHARED

    assert (SHARED in setup.method.collate(setup.train)) == packed
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


def kto_items_sharing_prompts():
    from alignkit.data.preference import KTOExample
    from alignkit.train.kto import with_mismatched

    examples = [KTOExample(p.prompt_ids, p.chosen_ids, True) for p in pairs()]
    examples += [KTOExample(p.prompt_ids, p.rejected_ids, False) for p in pairs()]
    return with_mismatched(examples, seed=0)  # example i and i + 6 share a prompt


def test_kto_step_continues_the_matched_prompts(monkeypatch):
    """Packed, the policy's mismatched rows continue the prompts of the training forward: the
    no-grad forward runs each prompt's last token and the mismatched completion only, and the
    loss and gradient equal those of running the whole mismatched rows."""
    from alignkit.train import kto as K

    items = kto_items_sharing_prompts()
    method = K.KTOMethod({"beta": 0.1}, pad_id=2, max_length=64)
    batch = method.collate([Indexed("train", i, it) for i, it in enumerate(items[:8])])
    prompts = {tuple(it.example.prompt_ids) for it in items[:8]}
    assert len(prompts) < 8  # some examples of the batch share a prompt
    width = sum(len(p) for p in prompts) + sum(len(it.example.completion_ids) for it in items[:8])
    assert batch[K.ROWS]["input_ids"].shape[1] == width  # each prompt once
    policy = LogpsModel(lora_policy())
    with torch.no_grad():  # a reference that puts z0 at 0.5, far from its clamp at 0
        kl_rows, _ = segment_logps(policy, batch[K.MISMATCHED], 8)
    method.reference = lambda b: torch.cat([torch.zeros(8), kl_rows - 0.5])
    widths = []
    real = LogpsModel.hidden_states

    def spy(self, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LogpsModel, "hidden_states", spy)

    def loss_and_grads(b):
        policy.zero_grad(set_to_none=True)
        out = method.step(policy, b)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return out.loss_sum.detach(), out.metrics["kl"], grads

    cont = loss_and_grads(batch)
    kl_tokens = sum(1 + len(it.kl_completion_ids) for it in items[:8])
    assert widths == [width, kl_tokens]
    widths.clear()
    full = loss_and_grads({k: v for k, v in batch.items() if k != K.CONTINUED})
    assert widths == [width, batch[K.MISMATCHED]["input_ids"].shape[1]]
    torch.testing.assert_close(cont[1], torch.full((8,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(cont[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cont[1], full[1], atol=1e-5, rtol=1e-5)
    assert cont[2].keys() == full[2].keys() and cont[2]
    for k in cont[2]:
        torch.testing.assert_close(cont[2][k], full[2][k], atol=1e-5, rtol=1e-4, msg=k)


def test_kto_reference_pass_batches_examples_by_prompt():
    """The precomputing pass puts examples that share a prompt in one batch (every example once)
    and gives the log-probs of the plain in-order pass."""
    from alignkit.train.kto import KTOMethod, by_prompt
    from alignkit.train.reference import compute_logps

    items = [Indexed("train", i, it) for i, it in enumerate(kto_items_sharing_prompts())]
    batches = by_prompt(items, 4)
    assert sorted(i for b in batches for i in b) == list(range(12))
    for b in batches:
        assert b and len(b) % 2 == 0  # whole prompts: both of each prompt's examples
        prompts = [tuple(items[i].example.example.prompt_ids) for i in b]
        assert all(prompts.count(p) == 2 for p in prompts)
    method = KTOMethod({}, pad_id=2, max_length=64)
    kto_ref_logps = method.ref_logps
    assert method.ref_order(items, 4) == batches  # packed: the pass runs by prompt
    model = LogpsModel(make_tiny_model(seed=0))
    kw = {"batch_size": 4, "device": torch.device("cpu")}
    grouped = compute_logps(model, items, method.collate, kto_ref_logps, order=by_prompt, **kw)
    plain = compute_logps(model, items, method.collate, kto_ref_logps, **kw)
    assert grouped.shape == (12, 2)
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every item exactly once"):
        compute_logps(model, items, method.collate, kto_ref_logps, order=lambda it, b: [[0]], **kw)
