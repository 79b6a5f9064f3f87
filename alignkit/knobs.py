"""Each method's own config section (`dpo.beta`, `kto.desirable_weight`, `ppo.kl_coef`, ...).

The method table (`alignkit.methods`) names the section class of every method; `alignkit.config`
builds the run config from it. A section is plain pydantic: unknown keys are rejected.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def loss_kwargs(self) -> dict[str, Any]:
        """The section's knobs as keyword arguments of the method's loss."""
        return self.model_dump()

    def check_active(self) -> None:
        """Checks that hold only when this section's method is the one run (ValueError)."""


class SFTConfig(Section):
    """SFT has no knobs beyond the shared ones yet; the section exists for symmetry."""


class DPOConfig(Section):
    """DPO (Rafailov et al. 2023); label_smoothing > 0 gives conservative DPO."""

    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class IPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="IPO's tau")


class BetaConfig(Section):
    """Losses whose one knob is the implicit reward's beta (hinge, and new losses reuse it)."""

    beta: float = Field(0.1, gt=0)


HingeConfig = BetaConfig


class RobustDPOConfig(Section):
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="assumed label-flip rate")


class SimPOConfig(Section):
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0, description="target reward margin")


class ORPOConfig(Section):
    lambda_: float = Field(0.1, gt=0, alias="lambda", description="weight of the odds-ratio term")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def loss_kwargs(self) -> dict[str, Any]:
        return {"beta": self.lambda_}  # the loss calls ORPO's lambda `beta`, as TRL does


class KTOConfig(Section):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class PPOConfig(Section):
    """RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

    Defaults follow the literature and the "N implementation details of RLHF with PPO" study
    (Huang et al. 2024): k1 KL penalty in the reward, adaptive KL (target 6, horizon 10000),
    GAE with gamma 1 and lambda 0.95, clip 0.2 for both ratio and value.
    """

    reward_model: list[str] = Field(
        default_factory=list, description="reward model path(s); several form an ensemble"
    )
    reward_combine: Literal["mean", "min"] = "mean"
    reward_fn: str | None = Field(None, description="'module:function' verifiable reward")
    normalize_reward: bool = Field(False, description="standardise scores with the RM's stats")
    kl_coef: float = Field(0.05, ge=0, description="initial KL penalty coefficient")
    adaptive_kl: bool = Field(True, description="adapt kl_coef toward kl_target")
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: float = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ppo_epochs: int = Field(4, gt=0)
    rollout_batch_size: int = Field(16, gt=0, description="prompts per PPO step")
    mini_batch_size: int = Field(4, gt=0, description="rollouts per optimizer step")
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="subtracted from the score of responses that never end"
    )
    eval_prompts: int = Field(64, gt=0, description="held-out prompts scored before/after")
    system_prompt: str | None = Field(None, description="system message put before each prompt")

    @field_validator("reward_model", mode="before")
    @classmethod
    def _one_path(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError("ppo.mini_batch_size cannot exceed ppo.rollout_batch_size")
        return self

    def check_active(self) -> None:
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ValueError(
                "ppo needs exactly one reward source: set ppo.reward_model (a reward model "
                "path or a list of them) or ppo.reward_fn ('module:function'), not both"
            )


class RewardConfig(Section):
    """Reward model: Bradley-Terry loss on pairs, with an optional per-pair `margin` column
    (Llama 2) and the reward-centering term of Eisenstein et al. 2023."""

    center_coef: float = Field(0.0, ge=0, description="weight of (r_chosen + r_rejected)^2")
    use_margin: bool = Field(True, description="read a numeric per-pair `margin` column if any")
