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

:class:`PPO` is this algorithm as the rollout loop (:mod:`alignkit.train.rl.loop`) runs it. Its
checkpoint state is the KL coefficient, the minibatch-shuffle generator and the reference's
scores on the evaluation prompts. Those scores are stored, not resampled: they are small, and
storing them keeps the resumed summary exact however the sampling kernels behave.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.config import RunConfig
from alignkit.data.prompts import PromptExample
from alignkit.losses.ppo import missing_eos_penalty, policy_loss, token_rewards, value_loss
from alignkit.ops.advantages import gae, masked_mean, masked_whiten
from alignkit.rollout.sampling import Rollout
from alignkit.train.rl.kl import make_kl_controller
from alignkit.train.rl.loop import Optim
from alignkit.train.rl.ppo_models import PPOBatch, PPOModels, build_ppo_models, make_batch
from alignkit.train.rl.sampling import Sampler, eval_metrics
from alignkit.train.rl.scoring import RewardSource


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


def _mb(n: int) -> float:
    return round(n / 2**20, 2)


def describe_layout(models: PPOModels) -> tuple[str, dict[str, float]]:
    """The start-of-run line about the models, and their parameter megabytes per component."""
    sizes = {k: _mb(v) for k, v in models.component_bytes().items()}
    text = ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
    how = (
        "policy and value are LoRA adapters on one frozen base; the reference is that base "
        "with adapters disabled (no copy)"
        if models.shared
        else "separate policy, frozen reference and value models (full fine-tuning)"
    )
    return f"[alignkit] ppo layout {models.layout}: {how}; parameters: {text}", sizes


class PPO:
    """PPO for the rollout loop (:class:`alignkit.train.rl.loop.RolloutAlgorithm`)."""

    def __init__(self, pcfg, tcfg, models: PPOModels, sampler: Sampler, accelerator):
        self.pcfg, self.tcfg, self.models, self.sampler = pcfg, tcfg, models, sampler
        self.acc = accelerator
        self.kl = make_kl_controller(pcfg)
        self.generator = torch.Generator().manual_seed(tcfg.seed)  # the minibatch shuffle
        self.eval_ref: dict[str, Tensor] | None = None  # the reference's evaluation, once
        self.layout = models.layout
        self.describe, self.param_mb = describe_layout(models)

    def trainable(self) -> nn.Module:
        return self.models.trainable()

    def updates_per_step(self) -> int:
        return updates_per_step(self.pcfg)

    def policy(self) -> AbstractContextManager[nn.Module]:
        return self.models.as_policy()

    def step(self, examples: list[PromptExample], opt: Optim) -> dict[str, float]:
        pcfg, micro = self.pcfg, self.tcfg.batch_size
        t0 = time.perf_counter()
        with self.models.as_policy() as module:
            rollout, _, scores = self.sampler.scored(module, examples)
        t1 = time.perf_counter()
        kl_coef = self.kl.value
        with self.acc.autocast():
            exp, metrics = make_experience(self.models, rollout, scores, pcfg, kl_coef, micro)
        metrics.update(
            ppo_updates(self.models, exp, pcfg, micro, opt, self.tcfg.max_grad_norm, self.generator)
        )
        t2 = time.perf_counter()
        self.kl.update(metrics["objective/kl"], len(examples))
        gen_tokens = int(rollout.response_mask.sum().item())
        train_tokens = int(exp.batch.attention_mask.sum().item()) * pcfg.ppo_epochs
        metrics.update(
            {
                "learning_rate": opt.scheduler.get_last_lr()[0],
                "rollout/tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
                "tokens_per_s": train_tokens / max(t2 - t1, 1e-9),
                "tokens": train_tokens,
            }
        )
        return metrics

    def evaluate(self, prompts: list[PromptExample]) -> dict[str, float]:
        """Policy against reference on the same prompts and seed; the reference is sampled
        once per run (its weights never change) and kept."""
        seed = self.tcfg.seed + 1
        if self.eval_ref is None:
            self.eval_ref = self.sampler.evaluate(self.models.as_reference(), prompts, seed)
        pol = self.sampler.evaluate(self.models.as_policy(), prompts, seed)
        return eval_metrics(pol, self.eval_ref)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl.state_dict(),
            "generator": self.generator.get_state(),
            "eval_ref": self.eval_ref,  # {"scores", "length", "eos"}: (N,) CPU tensors, or None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
        self.generator.set_state(state["generator"])
        self.eval_ref = state["eval_ref"]

    def save_final(self, out_dir: Path) -> None:
        self.models.save(self.sampler.tokenizer, out_dir)

    def summary_extras(self) -> dict[str, Any]:
        return {"kl_coef_final": self.kl.value}


def build_ppo(cfg: RunConfig, tokenizer, reward: RewardSource, accelerator) -> PPO:
    """PPO's models in their layout, with dropout off: rollout and update log-probs agree."""
    from alignkit.rollout.generate import stop_token_ids

    models = build_ppo_models(cfg, accelerator.device)
    models.train(False)
    stops = stop_token_ids(tokenizer, models.policy)
    return PPO(cfg.ppo, cfg.train, models, Sampler(tokenizer, reward, cfg.ppo, stops), accelerator)
