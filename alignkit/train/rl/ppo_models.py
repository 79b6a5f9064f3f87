"""The models PPO trains and reads, in one of two layouts.

- ``shared-lora`` (LoRA enabled): one frozen base carries two peft adapters, ``default`` (the
  policy) and ``value`` (the value model's trunk), plus a scalar value head; the reference is the
  same base with every adapter disabled. One copy of the base serves three roles.
- ``separate`` (full fine-tuning): a trainable policy, a frozen reference and a trainable value
  model (trunk + head), each its own copy of the starting model.

Both expose the same calls: hidden states for a role, response log-probs at a temperature,
per-token values, generation, parameter bytes per component, and saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from alignkit.losses.ppo import entropy_from_logits
from alignkit.ops.logps import target_logps
from alignkit.train.forward import unwrap_hf

POLICY, VALUE = "default", "value"
# Rows per block of the entropy metric. It holds about four fp32 (rows, V) temporaries at once
# (logits, log-softmax, its exp, their product), against one for the log-prob chunks: 128 rows
# keep that near 100 MB at a 49k vocabulary (0.3 GB at 152k) where 1024 rows took 0.8 (2.5) GB.
ENTROPY_CHUNK_ROWS = 128


class ResponseLogps(NamedTuple):
    logps: Tensor  # (B, R) log-prob of each response token at the temperature, fp32
    entropy: Tensor | None  # (B, R) entropy of the tempered distribution (no grad), or None


class PPOBatch(NamedTuple):
    """Prompts (left-padded) followed by responses (right-padded), one row per rollout."""

    input_ids: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    position_ids: Tensor  # (B, P + R), counting real tokens only
    response_ids: Tensor  # (B, R)
    response_mask: Tensor  # (B, R) 1 up to and including the stop token

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]


def make_batch(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask):
    """Join (B, P) left-padded prompts and (B, R) right-padded responses into a PPOBatch."""
    mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    return PPOBatch(ids, mask, positions, response_ids, response_mask.long())


def backbone_hidden(model: nn.Module, batch: PPOBatch) -> Tensor:
    """(B, R, H) last hidden states at the positions that predict each response token."""
    hf = unwrap_hf(model)
    out = hf.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    p = batch.prompt_len
    # token p + j (response token j) is predicted by the hidden state at p + j - 1
    return out.last_hidden_state[:, p - 1 : p - 1 + batch.response_ids.shape[1]]


def response_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> ResponseLogps:
    """log softmax(h W^T / T)[target] for (B, R, H) hidden states and (B, R) targets.

    Dividing by the sampling temperature makes old, new and reference log-probs describe the
    distribution the tokens were actually drawn from (Huang et al. 2024, detail 13).
    """
    b, r, h = hidden.shape
    flat = hidden.reshape(b * r, h)  # (B*R, H): one row per response position
    logps = target_logps(
        flat, weight, targets.reshape(-1), chunk_size=chunk_size, temperature=temperature
    ).view(b, r)
    entropy = None
    if with_entropy:
        rows = min(chunk_size, ENTROPY_CHUNK_ROWS)
        entropy = entropy_in_chunks(flat, weight, temperature, rows).view(b, r)
    return ResponseLogps(logps, entropy)


@torch.no_grad()
def entropy_in_chunks(hidden: Tensor, weight: Tensor, temperature: float, rows: int) -> Tensor:
    """(N, H) hidden states -> (N,) entropy of softmax(h W^T / T), fp32, `rows` at a time:
    only a (rows, V) block of logits ever exists, and each row's value is the unchunked one."""
    parts = [
        entropy_from_logits((hidden[s : s + rows] @ weight.T).float() / temperature)  # (c, V)
        for s in range(0, hidden.shape[0], rows)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class PPOModels:
    """Policy, reference and value model behind one interface (see the module docstring)."""

    def __init__(
        self,
        policy: nn.Module,
        value_head: nn.Linear,
        *,
        reference: nn.Module | None = None,
        value_model: nn.Module | None = None,
        chunk_size: int = 1024,
    ):
        self.policy, self.value_head, self.chunk_size = policy, value_head, chunk_size
        self.shared = reference is None
        self.layout = "shared-lora" if self.shared else "separate"
        self.reference, self.value_model = reference, value_model
        if self.shared:
            self._adapter_params = [
                p for n, p in policy.named_parameters() if f".{POLICY}." in n or f".{VALUE}." in n
            ]
            for p in self._adapter_params:
                p.requires_grad_(True)

    # -- roles --------------------------------------------------------------------------------
    def _activate(self, name: str) -> None:
        if self.policy.active_adapter != name:
            self.policy.set_adapter(name)
        # peft freezes inactive adapters when switching; both stay trainable here, since each
        # role's forward only ever touches its own adapter
        for p in self._adapter_params:
            p.requires_grad_(True)

    @contextlib.contextmanager
    def as_policy(self) -> Iterator[nn.Module]:
        """The module whose forward/generate is the policy."""
        if self.shared:
            self._activate(POLICY)
        yield self.policy

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        if self.shared:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def lm_weight(self, module: nn.Module) -> Tensor:
        return unwrap_hf(module).get_output_embeddings().weight  # (V, H)

    def policy_logps(self, batch: PPOBatch, temperature: float, with_entropy=False):
        with self.as_policy() as m:
            hidden = backbone_hidden(m, batch)
            return response_logps(
                hidden, self.lm_weight(m), batch.response_ids, temperature,
                chunk_size=self.chunk_size, with_entropy=with_entropy,
            )  # fmt: skip

    @torch.no_grad()
    def reference_logps(self, batch: PPOBatch, temperature: float) -> Tensor:
        with self.as_reference() as m:
            hidden = backbone_hidden(m, batch)
            w = self.lm_weight(m)
            return response_logps(hidden, w, batch.response_ids, temperature).logps

    def values(self, batch: PPOBatch) -> Tensor:
        """(B, R) value of the state before each response token."""
        if self.shared:
            self._activate(VALUE)
            try:
                hidden = backbone_hidden(self.policy, batch)
            finally:
                self._activate(POLICY)
        else:
            hidden = backbone_hidden(self.value_model, batch)
        head = self.value_head
        return head(hidden.to(head.weight.dtype)).squeeze(-1)

    # -- bookkeeping ----------------------------------------------------------------------------
    def trainable(self) -> nn.Module:
        """One module holding every trainable parameter (for the optimizer and clipping)."""
        parts = {"policy": self.policy, "value_head": self.value_head}
        if self.value_model is not None:
            parts["value_model"] = self.value_model
        return nn.ModuleDict(parts)

    def train(self, mode: bool = True) -> None:
        for m in (self.policy, self.value_model, self.value_head):
            if m is not None:
                m.train(mode)

    def component_bytes(self) -> dict[str, int]:
        """Parameter bytes per component; shared weights are counted once, under `base`."""
        head = param_bytes(self.value_head.parameters())
        if self.shared:
            named = list(self.policy.named_parameters())
            policy = [p for n, p in named if f".{POLICY}." in n]
            value = [p for n, p in named if f".{VALUE}." in n]
            base = [p for n, p in named if f".{POLICY}." not in n and f".{VALUE}." not in n]
            return {
                "base (policy + reference + value trunk)": param_bytes(base),
                "policy adapter": param_bytes(policy),
                "value adapter": param_bytes(value),
                "value head": head,
            }
        return {
            "policy": param_bytes(self.policy.parameters()),
            "reference": param_bytes(self.reference.parameters()),
            "value model": param_bytes(self.value_model.parameters()) + head,
        }

    def save(self, tokenizer, out_dir: Path) -> Path:
        """final/: the policy (adapter or full model) loadable as it is; value/ beside it."""
        from safetensors.torch import save_file

        from alignkit.models import save_final

        value_dir = out_dir / "value"
        if self.shared:
            self._activate(POLICY)
            # peft writes the default adapter at the top and the `value` adapter in value/
            save_final(self.policy, tokenizer, out_dir)
        else:
            save_final(self.policy, tokenizer, out_dir)
            self.value_model.save_pretrained(value_dir)
        value_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(value_dir / "value_head.safetensors"))
        return out_dir


def new_value_head(hidden_size: int, device) -> nn.Linear:
    """A scalar head on the last hidden state, zero-initialised so values start at 0 and the
    first advantages are the (whitened) rewards themselves."""
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def add_value_adapter(peft_model: nn.Module) -> None:
    """A second LoRA adapter, configured like the policy's, for the value model's trunk."""
    peft_model.add_adapter(VALUE, peft_model.peft_config[POLICY])
    peft_model.set_adapter(POLICY)


def build_ppo_models(cfg, device) -> PPOModels:
    """Load the layout the config asks for: shared-lora with LoRA, separate without."""
    from alignkit.config import LoraConfig
    from alignkit.models import load_model

    load = dict(device=device, gradient_checkpointing=cfg.train.gradient_checkpointing)
    policy = load_model(cfg.model, cfg.lora, **load)
    hidden = unwrap_hf(policy).config.hidden_size
    head = new_value_head(hidden, device)
    chunk = cfg.train.logps_chunk_size
    if cfg.lora.enabled:
        add_value_adapter(policy)
        return PPOModels(policy, head, chunk_size=chunk)
    reference = load_model(cfg.model, LoraConfig(enabled=False), device=device, for_training=False)
    value_model = load_model(cfg.model, LoraConfig(enabled=False), **load)
    return PPOModels(policy, head, reference=reference, value_model=value_model, chunk_size=chunk)
