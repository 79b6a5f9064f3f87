"""Small PPO pieces for tests: tiny shared-LoRA models, hand-made batches, an optimizer."""

from __future__ import annotations

import torch
from conftest import make_tiny_model

from alignkit.config import LoraConfig, load_config
from alignkit.models.lora import apply_lora
from alignkit.train.rl.loop import Optim
from alignkit.train.rl.ppo_models import PPOModels, add_value_adapter, make_batch, new_value_head

VOCAB = 64


def ppo_cfg(*overrides: str):
    base = ["method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_format"]
    return load_config(None, base + list(overrides)).ppo


def shared_models(seed: int = 0, *, randomize_adapters: bool = False) -> PPOModels:
    base = make_tiny_model(seed, vocab_size=VOCAB)
    peft = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    add_value_adapter(peft)
    if randomize_adapters:  # lora_B starts at zero: make the adapters actually change outputs
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return PPOModels(peft, new_value_head(32, "cpu"))


def toy_batch(seed: int = 0):
    """Two prompts (one left-padded) and two responses (one shorter, right-padded)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=gen)
    prompt_mask = torch.ones(2, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt[1, :2] = 2
    response = torch.randint(3, VOCAB, (2, 4), generator=gen)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    response[1, 1] = 2  # the second response ends with EOS
    response[1, 2:] = 2
    return make_batch(prompt, prompt_mask, response, response_mask)


def plain_optim(models: PPOModels, lr: float = 1e-2) -> Optim:
    from alignkit.config import TrainConfig
    from alignkit.train.loop import make_optimizer, make_scheduler

    tcfg = TrainConfig(lr=lr, scheduler="constant")
    trainable = models.trainable()
    opt = make_optimizer(trainable, tcfg)
    params = [p for p in trainable.parameters() if p.requires_grad]
    return Optim(
        opt,
        make_scheduler(opt, tcfg, 100),
        lambda loss: loss.backward(),
        lambda norm: torch.nn.utils.clip_grad_norm_(params, norm),
    )
