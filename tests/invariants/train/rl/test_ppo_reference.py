"""The PPO reference is the starting model, whatever the layout, and padding changes nothing."""

import torch
from conftest import make_tiny_model

from alignkit.train.rl.ppo_models import PPOModels, make_batch, new_value_head
from tests.ppo_utils import VOCAB, shared_models, toy_batch


def _fresh_logps(model, batch, temperature):
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    p, r = batch.prompt_len, batch.response_ids.shape[1]
    logits = out.logits[:, p - 1 : p - 1 + r].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None])[..., 0]


@torch.no_grad()
def test_adapter_disabled_reference_equals_a_fresh_base():
    models = shared_models(seed=3, randomize_adapters=True)
    batch = toy_batch()
    ref = models.reference_logps(batch, 0.7)
    fresh = _fresh_logps(make_tiny_model(3, vocab_size=VOCAB), batch, 0.7)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(ref[mask], fresh[mask], rtol=1e-5, atol=1e-5)
    policy = models.policy_logps(batch, 0.7).logps
    assert (policy[mask] - ref[mask]).abs().max() > 1e-3  # the adapter is on for the policy
    # and the reference pass left the policy adapter active
    torch.testing.assert_close(models.policy_logps(batch, 0.7).logps, policy)


@torch.no_grad()
def test_value_adapter_does_not_leak_into_the_policy():
    models = shared_models(seed=4, randomize_adapters=True)
    batch = toy_batch()
    before = models.policy_logps(batch, 1.0).logps
    models.values(batch)
    torch.testing.assert_close(models.policy_logps(batch, 1.0).logps, before)
    with torch.no_grad():  # changing only the value adapter leaves the policy as it was
        for n, p in models.policy.named_parameters():
            if ".value." in n:
                p.add_(1.0)
    torch.testing.assert_close(models.policy_logps(batch, 1.0).logps, before)


@torch.no_grad()
def test_separate_layout_matches_shared_layout_at_start():
    shared = shared_models(seed=5)  # lora_B = 0: policy == base
    separate = PPOModels(
        make_tiny_model(5, vocab_size=VOCAB),
        new_value_head(32, "cpu"),
        reference=make_tiny_model(5, vocab_size=VOCAB),
        value_model=make_tiny_model(5, vocab_size=VOCAB),
    )
    assert (shared.layout, separate.layout) == ("shared-lora", "separate")
    batch = toy_batch()
    mask = batch.response_mask.bool()
    for a, b in (
        (shared.policy_logps(batch, 0.7).logps, separate.policy_logps(batch, 0.7).logps),
        (shared.reference_logps(batch, 0.7), separate.reference_logps(batch, 0.7)),
    ):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)
    sizes = separate.component_bytes()
    assert sizes["policy"] == sizes["reference"]  # three full copies in this layout
    shared_sizes = shared.component_bytes()
    assert shared_sizes["policy adapter"] < shared_sizes["base (policy + reference + value trunk)"]


@torch.no_grad()
def test_left_padding_does_not_change_logps_or_values():
    models = shared_models(seed=6, randomize_adapters=True)
    torch.nn.init.normal_(models.value_head.weight)
    batch = toy_batch()
    together = models.policy_logps(batch, 0.7).logps
    values = models.values(batch)
    for i in range(2):  # each row alone, without the other row's padding
        keep_p = batch.attention_mask[i, : batch.prompt_len].bool()
        keep_r = batch.response_mask[i].bool()
        alone = make_batch(
            batch.input_ids[i : i + 1, : batch.prompt_len][:, keep_p],
            torch.ones(1, int(keep_p.sum()), dtype=torch.long),
            batch.response_ids[i : i + 1][:, keep_r],
            torch.ones(1, int(keep_r.sum()), dtype=torch.long),
        )
        torch.testing.assert_close(
            models.policy_logps(alone, 0.7).logps[0], together[i][keep_r], rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(models.values(alone)[0], values[i][keep_r], rtol=1e-4, atol=1e-4)
