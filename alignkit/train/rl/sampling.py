"""Sampling and scoring rollouts with a run's settings, and the policy-vs-reference evaluation.

Shared by every online method: the method's config section supplies `max_new_tokens`,
`temperature`, `top_p` and `rollout_batch_size`. The evaluation samples the policy's and the
reference's responses to the same held-out prompts with one fixed seed, so `eval/score` against
`eval/ref_score` measures the improvement and not the sampling noise.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from alignkit.data.prompts import PromptExample
from alignkit.rollout.sampling import Rollout, decode_responses, sample_responses
from alignkit.train.rl.scoring import RewardSource


class Sampler:
    """Samples, decodes and scores prompt batches with the section's sampling settings."""

    def __init__(self, tokenizer, reward: RewardSource, section, stops: list[int]):
        self.tokenizer, self.reward, self.section = tokenizer, reward, section
        self.stops = stops
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def sample(
        self, module: nn.Module, examples: list[PromptExample], greedy: bool = False
    ) -> Rollout:
        s = self.section
        return sample_responses(
            module,
            [e.prompt_ids for e in examples],
            pad_id=self.pad,
            stops=self.stops,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            greedy=greedy,
        )

    def scored(self, module: nn.Module, examples: list[PromptExample]):
        """(rollout, response texts, (N,) scores) for one batch of prompts."""
        rollout = self.sample(module, examples)
        texts = decode_responses(self.tokenizer, rollout)
        return rollout, texts, self.reward(examples, texts)

    @torch.no_grad()
    def evaluate(
        self, role: AbstractContextManager[nn.Module], examples: list[PromptExample], seed: int
    ) -> dict[str, Tensor]:
        """Scores, lengths and EOS flags, each (N,), of the responses of the model `role`
        yields, sampled with a fixed seed that leaves the run's RNG streams untouched."""
        scores, lengths, ended = [], [], []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        batch = self.section.rollout_batch_size
        with torch.random.fork_rng(devices=devices), role as module:
            torch.manual_seed(seed)
            for s in range(0, len(examples), batch):
                rollout, _, score = self.scored(module, examples[s : s + batch])
                scores.append(score)
                lengths.append(rollout.response_mask.sum(1).float().cpu())
                ended.append(rollout.ended.float().cpu())
        return {"scores": torch.cat(scores), "length": torch.cat(lengths), "eos": torch.cat(ended)}


def eval_metrics(policy: dict, reference: dict) -> dict[str, float]:
    """Policy vs reference on the same prompts: mean scores, gain, win rate (ties count half)."""
    p, r = policy["scores"], reference["scores"]
    wins = (p > r).float() + 0.5 * (p == r).float()
    return {
        "eval/score": p.mean().item(),
        "eval/ref_score": r.mean().item(),
        "eval/score_gain": (p - r).mean().item(),
        "eval/win_rate": wins.mean().item(),
        "eval/response_length": policy["length"].mean().item(),
        "eval/eos_fraction": policy["eos"].mean().item(),
    }
