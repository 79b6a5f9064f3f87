"""Batched chat generation: samples before/after training, `alignkit generate`, later rollouts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# A user message, or a whole conversation (system and earlier turns) whose last turn is answered
Prompt = str | list[dict[str, str]]


class Generation(NamedTuple):
    prompt: Prompt
    text: str  # the response, special tokens removed
    num_tokens: int
    ended: bool  # True when the model emitted its end-of-turn/EOS token


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS plus the model's generation EOS."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for i in eos if isinstance(eos, list) else [eos]:
        if i is not None:
            ids.add(int(i))
    return sorted(ids)


def render_prompts(tokenizer, prompts: list[Prompt], system: str | None = None) -> list[str]:
    """Each prompt rendered with the chat template and its generation prompt; a conversation
    keeps every turn (`system` goes first only if it has no system message of its own)."""
    texts = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}, *msgs]
        if getattr(tokenizer, "chat_template", None):
            texts.append(
                tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            )
        else:  # no template: the turns' text, one per paragraph
            texts.append("\n\n".join(m["content"] for m in msgs) if not isinstance(p, str) else p)
    return texts


@torch.no_grad()
def generate_chat(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    system: str | None = None,
) -> list[Generation]:
    """Apply the chat template, generate (greedy when temperature is 0), decode responses."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer, model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    device = next(model.parameters()).device
    results: list[Generation] = []
    try:
        texts = render_prompts(tokenizer, prompts, system)
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[s : s + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            sample = temperature > 0
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
            for i, row in enumerate(new.tolist()):
                hit = next((j for j, t in enumerate(row) if t in stops), None)
                kept = row if hit is None else row[:hit]
                results.append(
                    Generation(
                        prompts[s + i],
                        tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        len(kept) + (0 if hit is None else 1),
                        hit is not None,
                    )
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results
