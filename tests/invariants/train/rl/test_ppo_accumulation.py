"""A PPO minibatch gives the same gradient in micro-batches of 1 as in one piece: its loss is
normalised over all response tokens of the minibatch, not per micro-batch."""

import torch

from alignkit.train.rl.loop import Optim
from alignkit.train.rl.ppo import Experience, UpdateSums, minibatch_loss
from tests.ppo_utils import ppo_cfg, shared_models, toy_batch


def _grads(micro: int) -> dict[str, torch.Tensor]:
    models = shared_models(seed=7, randomize_adapters=True)
    torch.nn.init.normal_(models.value_head.weight, std=0.1)
    batch = toy_batch(seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        old = models.policy_logps(batch, 0.7).logps + 0.1 * torch.randn(2, 4, generator=gen)
        values = models.values(batch)
    mask = batch.response_mask
    exp = Experience(
        batch, old, old, values, torch.randn(2, 4, generator=gen) * mask,
        torch.randn(2, 4, generator=gen) * mask, torch.zeros(2), torch.ones(2, dtype=torch.bool),
    )  # fmt: skip
    opt = Optim(None, None, lambda loss: loss.backward(), lambda n: 0.0)
    pcfg = ppo_cfg("ppo.vf_coef=0.5", "ppo.mini_batch_size=2")
    minibatch_loss(models, exp, torch.arange(2), pcfg, micro, opt, UpdateSums())
    trainable = models.trainable()
    return {n: p.grad.clone() for n, p in trainable.named_parameters() if p.grad is not None}


def test_micro_batches_give_the_minibatch_gradient():
    whole, split = _grads(2), _grads(1)
    assert set(whole) == set(split)
    assert any(".default." in n for n in whole) and any(".value." in n for n in whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)
