"""Reward models: a scalar head on a causal LM, read at the last real token; load and score.

A reward model is transformers' ``AutoModelForSequenceClassification`` with one label: the decoder
of a causal LM plus a bias-free ``score`` head, so ``final/`` loads with transformers/peft as it
is. alignkit runs the decoder itself and reads the score at each row's last real token, found from
the attention mask. transformers' own forward finds that token by comparing ids with
``pad_token_id``, which is wrong whenever pad == eos (the default model): it would read the token
*before* the closing end-of-turn. Score with :class:`RewardScorer` (or pass single unpadded rows
to the plain transformers model) to get the scores training optimised.

After training, ``final/alignkit_reward.json`` records ``{"type": "reward", "mean", "std"}`` of
the rewards on the eval split; :func:`load_reward_model` reads it into ``RewardScorer.stats``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit.errors import ModelError
from alignkit.models.decoder import decoder_hidden_states, unwrap_hf

REWARD_INFO = "alignkit_reward.json"
Combine = Literal["mean", "min"]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B,) column of each row's last real token, for either padding side.

    Token ids are never compared with the pad id: with pad == eos the closing EOS, the very
    token to read, would count as padding.
    """
    cols = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (cols * (attention_mask != 0)).argmax(-1)  # largest real column per row


def score_head(hf: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (`score` for decoder LMs)."""
    for name in ("score", "classifier"):
        head = getattr(hf, name, None)
        if head is not None:
            return head
    raise ModelError(
        f"{type(hf).__name__} has no scalar head (score)",
        hint="a reward model is a sequence-classification model: train one with `method: reward`",
    )


class RewardModel(nn.Module):
    """Wraps a sequence-classification model: forward(...) -> (S,) fp32 rewards.

    The wrapper, not the model, is what the training loop prepares, so distributed wrappers see
    the whole computation (decoder and head) as one forward call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        score_head(unwrap_hf(model))  # fail early on a model without one

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None = None,
        read_rows: Tensor | None = None,
        read_cols: Tensor | None = None,
        spans: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, T); attention_mask: (B, T), or a block mask (B, 1, T, T) with
        position_ids and read positions. read_rows/read_cols (S,) name the hidden states to
        score; by default each row's last real token (S = B). A packed row (B = 1, no padding)
        names its examples' `spans` (K, 3) so attention runs example by example
        (:mod:`alignkit.ops.packed_attention`), the scores those of the unpacked rows."""
        if position_ids is None:
            if attention_mask.dim() != 2:
                raise ValueError("a 4D-mask batch must come with its position_ids")
            # count from each row's first real token, so left and right padding agree
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if read_rows is None or read_cols is None:
            read_rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            read_cols = last_token_index(attention_mask)
        hidden = decoder_hidden_states(  # (B, T, H)
            self.model, input_ids, attention_mask, position_ids, spans
        )
        picked = hidden[read_rows, read_cols]  # (S, H): only the positions that are scored
        return score_head(unwrap_hf(self.model))(picked).squeeze(-1).float()


def combine_rewards(scores: Tensor, combine: Combine) -> Tensor:
    """(K, N) scores of K reward models -> (N,). The minimum is the conservative ensemble
    (Coste et al. 2024, worst-case optimisation), a mitigation for reward hacking."""
    if combine == "mean":
        return scores.mean(0)
    if combine == "min":
        return scores.min(0).values
    raise ValueError(f"combine must be 'mean' or 'min', got {combine!r}")


def _as_messages(prompt: str | list[dict]) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class RewardScorer:
    """A loaded reward model with its tokenizer; scores prompt/response pairs without grad."""

    def __init__(self, model: nn.Module, tokenizer: Any, stats: dict | None = None):
        self.module = RewardModel(model).eval()
        self.tokenizer = tokenizer
        self.stats = stats
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and mask, padded on either side -> (B,) fp32 scores on the model's device."""
        dev = self.device
        return self.module(input_ids.to(dev), attention_mask.to(dev))

    def encode(
        self,
        prompts: list[str | list[dict]],
        responses: list[str],
        max_length: int | None = None,
    ) -> list[list[int]]:
        """Token ids of each prompt + response, rendered exactly as reward training renders them.

        Over `max_length`, the prompt's left side is cut first (as data.truncation=truncate
        does), then the response's: the end, where the score is read, is always kept.
        """
        from alignkit.data.preference import encode_responses, render_responses

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rendered = [
            render_responses(
                _as_messages(p), [[{"role": "assistant", "content": r}]], self.tokenizer
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        rows = [prompt + reply for prompt, reply in encode_responses(rendered, self.tokenizer)]
        return rows if max_length is None else [row[-max_length:] for row in rows]

    @torch.no_grad()
    def score(
        self,
        prompts: list[str | list[dict]],
        responses: list[str],
        *,
        batch_size: int = 8,
        max_length: int | None = None,
    ) -> Tensor:
        """(N,) fp32 CPU scores; prompts are user messages or conversations, responses the
        assistant turn that answers them."""
        rows = self.encode(prompts, responses, max_length)
        out = torch.zeros(len(rows), dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            out[idx] = self.score_ids(ids, mask).cpu()
        return out


class RewardEnsemble:
    """Several reward models as one: their scores combined by mean or minimum.

    ``normalize=True`` first standardises each member with its recorded stats, so models with
    different offsets and scales contribute comparably.
    """

    def __init__(
        self, scorers: list[RewardScorer], combine: Combine = "mean", *, normalize: bool = False
    ):
        if not scorers:
            raise ValueError("an ensemble needs at least one reward model")
        if combine not in ("mean", "min"):
            raise ModelError(f"unknown combine '{combine}'", hint="use mean or min")
        if normalize and any(s.stats is None for s in scorers):
            raise ModelError(
                "normalize needs every reward model's stats (alignkit_reward.json)",
                hint="use reward models trained with `method: reward`, or normalize=false",
            )
        self.scorers, self.combine, self.normalize = scorers, combine, normalize
        self.tokenizer = scorers[0].tokenizer
        self.stats = None
        vocab = self.tokenizer.get_vocab()
        self.shared_tokenizer = all(s.tokenizer.get_vocab() == vocab for s in scorers[1:])

    def _standardise(self, scorer: RewardScorer, scores: Tensor) -> Tensor:
        if not self.normalize:
            return scores
        return (scores - scorer.stats["mean"]) / max(scorer.stats["std"], 1e-6)

    def score(
        self,
        prompts: list[str | list[dict]],
        responses: list[str],
        *,
        batch_size: int = 8,
        max_length: int | None = None,
    ) -> Tensor:
        each = [
            self._standardise(
                s, s.score(prompts, responses, batch_size=batch_size, max_length=max_length)
            )
            for s in self.scorers
        ]
        return combine_rewards(torch.stack(each), self.combine)  # (K, N) -> (N,)

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self.shared_tokenizer:
            raise ModelError(
                "the ensemble's reward models use different tokenizers, so one batch of token "
                "ids cannot be scored by all of them",
                hint="score text with .score(), or combine reward models with one tokenizer",
            )
        each = [
            self._standardise(s, s.score_ids(input_ids, attention_mask).to(input_ids.device))
            for s in self.scorers
        ]
        return combine_rewards(torch.stack(each), self.combine)


# --------------------------------------------------------------------------- loading


def _not_reward_model(path: str, why: str) -> ModelError:
    return ModelError(
        f"'{path}' is not an alignkit/transformers reward model ({why})",
        hint="train one with `method: reward` (alignkit train examples/reward_hh.yaml), or pass "
        "a sequence-classification model with one label",
    )


def _model_dir(path: str) -> str:
    """A run directory stands for its final/ model; a missing path is an error."""
    p = Path(path).expanduser()
    if (p / "final").is_dir() and not (p / "config.json").exists():
        return str(p / "final")
    return str(p)


def read_reward_stats(directory: str) -> dict | None:
    """{"mean", "std"} from the directory's alignkit_reward.json, or None."""
    info = Path(directory) / REWARD_INFO
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
        return {"mean": float(data["mean"]), "std": float(data["std"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{REWARD_INFO} is not valid: {exc}", where=str(info)) from None


def write_reward_info(directory: str | Path, mean: float, std: float, **extra: Any) -> Path:
    out = Path(directory) / REWARD_INFO
    record = {"type": "reward", "mean": mean, "std": std, **extra}
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out


def _check_full_model(path: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_reward_model(path, f"its config cannot be read: {exc}") from None
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise _not_reward_model(path, f"its architecture is {', '.join(archs) or 'unknown'}")
    if config.num_labels != 1:
        raise _not_reward_model(path, f"its head has {config.num_labels} outputs, not one")


def load_reward_model(path: str, *, device=None, dtype: str = "auto") -> RewardScorer:
    """A reward model (full model, a LoRA reward run's final/ adapter, or its run directory)."""

    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models.load import (
        load_adapter,
        load_model,
        load_tokenizer,
        read_adapter_config,
    )
    from alignkit.models.lora import merge_lora
    from alignkit.models.resolve import resolve_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    directory = _model_dir(path)
    resolved = resolve_model(directory)  # ModelError for a missing path or a non-model dir
    adapter_cfg = read_adapter_config(resolved)
    if adapter_cfg is None:
        _check_full_model(resolved.path)
        cfg = ModelConfig(name=directory, dtype=dtype)
        model = load_model(cfg, LoraConfig(), device=device, for_training=False, head="reward")
        return RewardScorer(model, load_tokenizer(cfg), read_reward_stats(directory))
    if adapter_cfg.get("task_type") != "SEQ_CLS":
        raise _not_reward_model(
            directory, f"a LoRA adapter of task {adapter_cfg.get('task_type')}, not SEQ_CLS"
        )
    model, tokenizer = load_adapter(directory, adapter_cfg, device, dtype=dtype, head="reward")
    return RewardScorer(merge_lora(model).eval(), tokenizer, read_reward_stats(directory))


def load_reward_models(
    paths: list[str], combine: Combine = "mean", *, device=None
) -> RewardScorer | RewardEnsemble:
    """One path: its RewardScorer; several: a RewardEnsemble combining them."""
    if not paths:
        raise ModelError("no reward model given", hint="pass at least one reward model path")
    scorers = [load_reward_model(p, device=device) for p in paths]
    return scorers[0] if len(scorers) == 1 else RewardEnsemble(scorers, combine)
