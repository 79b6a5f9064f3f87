"""One PPO step for RLHF: rollouts -> experience (rewards, advantages) -> clipped updates.

The order of operations follows Ziegler et al. 2019 and Huang et al. 2024 ("The N+
Implementation Details of RLHF with PPO"):

1. sample responses with temperature/top-p; a response ends at its first stop token;
2. score them (reward model or function), subtract the missing-EOS penalty;
3. log-probs of the sampled tokens under the rollout policy and the reference, at the
   sampling temperature, and the value of every response position;
4. per-token reward -kl_coef * (logp - ref_logp), plus the score at the last token; optional
   reward whitening (scale only); GAE; advantage whitening;
5. `ppo_epochs` passes over shuffled minibatches of `mini_batch_size` rollouts, each one
   optimizer step; a minibatch is processed in micro-batches of `train.batch_size` and its loss
   is normalised over all response tokens of the minibatch (global normalisation);
6. the KL controller is updated from the step's mean sequence KL.

Dropout stays off throughout (models in eval mode), so the rollout and update log-probs of the
same weights agree and the ratio starts at exactly 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from alignkit.losses.ppo import missing_eos_penalty, policy_loss, token_rewards, value_loss
from alignkit.ops.advantages import gae, masked_mean, masked_whiten
from alignkit.rollout.sampling import Rollout
from alignkit.train.ppo_models import PPOBatch, PPOModels, make_batch


@dataclass
class Experience:
    """Everything an update needs about B rollouts; tensors are (B, R) unless noted."""

    batch: PPOBatch
    old_logps: Tensor
    ref_logps: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor  # (B,) after the missing-EOS penalty
    ended: Tensor  # (B,) bool

    @property
    def mask(self) -> Tensor:
        return self.batch.response_mask

    def select(self, idx: Tensor, trim: bool = True) -> Experience:
        """Rows `idx`; with `trim`, response columns past the longest selected one are cut."""
        b = self.batch
        width = b.response_ids.shape[1]
        if trim:
            width = max(1, int(b.response_mask[idx].sum(1).max().item()))
        p = b.prompt_len
        batch = PPOBatch(
            b.input_ids[idx, : p + width],
            b.attention_mask[idx, : p + width],
            b.position_ids[idx, : p + width],
            b.response_ids[idx, :width],
            b.response_mask[idx, :width],
        )
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "batch":
                out[f.name] = v[idx, :width] if v.dim() == 2 else v[idx]
        return Experience(batch=batch, **out)


def _in_chunks(n: int, size: int, device) -> list[Tensor]:
    return [torch.arange(s, min(s + size, n), device=device) for s in range(0, n, size)]


@torch.no_grad()
def rollout_forward(models: PPOModels, batch: PPOBatch, temperature: float, micro: int):
    """(old_logps, ref_logps, values), each (B, R), computed micro-batch by micro-batch."""
    olds, refs, vals = [], [], []
    for idx in _in_chunks(batch.input_ids.shape[0], micro, batch.input_ids.device):
        sub = PPOBatch(*(t[idx] for t in batch))
        olds.append(models.policy_logps(sub, temperature).logps)
        refs.append(models.reference_logps(sub, temperature))
        vals.append(models.values(sub).float())
    return torch.cat(olds), torch.cat(refs), torch.cat(vals)


def compute_advantages(
    scores: Tensor, old_logps: Tensor, ref_logps: Tensor, values: Tensor, mask: Tensor, pcfg,
    kl_coef: float,
) -> tuple[Tensor, Tensor, dict[str, float]]:  # fmt: skip
    """(advantages, returns) from scores and log-probs, plus the objective metrics."""
    mask_f = mask.float()
    tr = token_rewards(scores, old_logps, ref_logps, mask, kl_coef)
    rewards = tr.rewards
    if pcfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv = gae(rewards, values * mask_f, mask, pcfg.gamma, pcfg.lam)
    advantages = masked_whiten(adv.advantages, mask)
    seq_kl = tr.kl.sum(1)  # (B,) sequence KL: the sum of per-token k1 estimates
    non_score = tr.non_score.sum(1)
    metrics = {
        "objective/kl": seq_kl.mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        # entropy of the sampled sequences, estimated by their negative log-likelihood
        "objective/entropy": (-old_logps * mask_f).sum(1).mean().item(),
        "val/mean": masked_mean(values, mask).item(),
        "val/returns": masked_mean(adv.returns, mask).item(),
    }
    return advantages, adv.returns, metrics


def make_experience(
    models: PPOModels, rollout: Rollout, raw_scores: Tensor, pcfg, kl_coef: float, micro: int
) -> tuple[Experience, dict[str, float]]:
    """Step 2-4 of the module docstring for one rollout batch."""
    batch = make_batch(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )
    device = batch.input_ids.device
    old, ref, values = rollout_forward(models, batch, pcfg.temperature, micro)
    scores = missing_eos_penalty(raw_scores.to(device), rollout.ended, pcfg.missing_eos_penalty)
    mask = batch.response_mask
    advantages, returns, metrics = compute_advantages(scores, old, ref, values, mask, pcfg, kl_coef)
    lengths = mask.sum(1).float()
    metrics.update(
        {
            "objective/raw_scores": raw_scores.float().mean().item(),
            "response/length": lengths.mean().item(),
            "response/eos_fraction": rollout.ended.float().mean().item(),
            "kl_coef": kl_coef,
        }
    )
    exp = Experience(batch, old, ref, values, advantages, returns, scores, rollout.ended)
    return exp, metrics


class UpdateSums:
    """Token-weighted sums of the update metrics over every minibatch of a PPO step."""

    NAMES = ("policy/approxkl", "policy/clipfrac", "policy/entropy", "val/vf_loss", "val/clipfrac")

    def __init__(self):
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.tokens = 0.0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def means(self) -> dict[str, float]:
        out = {k: v / max(self.tokens, 1.0) for k, v in self.sums.items()}
        out["loss"] = sum(self.losses) / max(len(self.losses), 1)
        out["grad_norm"] = sum(self.grad_norms) / max(len(self.grad_norms), 1)
        return out


@dataclass
class Optim:
    """What an update step needs from the training machinery."""

    optimizer: Any
    scheduler: Any
    backward: Callable[[Tensor], None]
    clip: Callable[[float], float]  # max norm -> grad norm before clipping
    autocast: Callable[[], Any] = contextlib.nullcontext  # mixed-precision forward context


def minibatch_loss(
    models: PPOModels, exp: Experience, idx: Tensor, pcfg, micro: int, opt: Optim,
    sums: UpdateSums,
) -> float:  # fmt: skip
    """Forward and backward one minibatch, micro-batch by micro-batch; returns its loss.

    Each micro-batch's summed per-token loss is divided by the token count of the whole
    minibatch, so accumulation gives the same gradient as one big batch.
    """
    total = exp.mask[idx].sum().clamp(min=1).float()
    loss = 0.0
    for part in idx.split(micro):
        sub = exp.select(part)
        mask = sub.mask
        with opt.autocast():
            out = models.policy_logps(sub.batch, pcfg.temperature, with_entropy=True)
        pl = policy_loss(out.logps, sub.old_logps, sub.advantages, mask, pcfg.cliprange)
        p_term = pl.losses.sum() / total
        opt.backward(p_term)
        # with vf_coef 0 no gradient is wanted, but the value loss is still reported
        grad = torch.enable_grad() if pcfg.vf_coef > 0 else torch.no_grad()
        with grad, opt.autocast():
            values = models.values(sub.batch).float()
        vl = value_loss(values, sub.old_values, sub.returns, mask, pcfg.cliprange_value)
        v_term = pcfg.vf_coef * vl.losses.sum() / total
        if pcfg.vf_coef > 0:
            opt.backward(v_term)
        loss += p_term.item() + v_term.item()
        s = sums.sums
        s["policy/approxkl"] += pl.approxkl.sum().item()
        s["policy/clipfrac"] += pl.clipped.sum().item()
        s["policy/entropy"] += (out.entropy * mask).sum().item()
        s["val/vf_loss"] += vl.losses.sum().item()
        s["val/clipfrac"] += vl.clipped.sum().item()
        sums.tokens += mask.sum().item()
    return loss


def ppo_updates(
    models: PPOModels, exp: Experience, pcfg, micro: int, opt: Optim, max_norm: float | None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:  # fmt: skip
    """Step 5: `ppo_epochs` passes of shuffled minibatches, one optimizer step each."""
    sums = UpdateSums()
    n = exp.mask.shape[0]
    for _ in range(pcfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(exp.mask.device)
        for idx in order.split(pcfg.mini_batch_size):
            sums.losses.append(minibatch_loss(models, exp, idx, pcfg, micro, opt, sums))
            sums.grad_norms.append(float(opt.clip(max_norm or float("inf"))))
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
    return sums.means()


def updates_per_step(pcfg) -> int:
    """Optimizer steps in one PPO step."""
    per_epoch = -(-pcfg.rollout_batch_size // pcfg.mini_batch_size)
    return pcfg.ppo_epochs * per_epoch
