"""Run configuration: one YAML file plus dotted overrides, validated strictly.

Unknown keys are errors (with the nearest valid key suggested), wrong types are errors naming the
key, and the resolved configuration is written into the run directory so a run can be repeated.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from alignkit.errors import ConfigError

METHODS = ("sft", "dpo", "ipo", "hinge", "robust_dpo", "simpo", "orpo", "kto", "ppo", "reward")
PAIR_METHODS = ("dpo", "ipo", "hinge", "robust_dpo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
# Methods without a configurable reference: PPO's is always its starting model (the adapter-off
# base with LoRA, a frozen copy of model.name without), so `reference` would be ignored there.
NO_REFERENCE = ("sft", "reward", "ppo", *REFERENCE_FREE)


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name: str = Field("smollm2-135m", description="HF directory, hub id, .gguf file or alias")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a directory)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    chat_template: str | None = Field(
        None, description="Named template (chatml, llama3, alpaca) or a Jinja string"
    )
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    qlora: bool = Field(False, description="Load the base in 4-bit NF4 (double quant)")


class DataConfig(Section):
    train: str | None = None
    eval: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held-out share of `train`")
    eval_size: int | None = Field(None, gt=0, description="Held-out rows of `train`")
    format: str = "auto"
    column_map: dict[str, str] = Field(default_factory=dict)
    split: str = "train"
    limit: int | None = Field(None, gt=0, description="Use only the first N rows")
    max_length: int = Field(1024, gt=0)
    truncation: Literal["drop", "truncate", "error"] = "drop"
    packing: bool = False
    completion_only: bool = Field(True, description="Loss on assistant turns only")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0, description="Per process, per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    parity: bool = Field(
        False, description="Turn the speed levers off (plain layout) to compare with TRL"
    )
    group_by_length: bool = True
    group_by_prompt: bool | None = Field(
        None,
        description="KTO: put the examples that share a prompt in the same micro-batch (a "
        "pair's two halves together: the batch holds both labels of each prompt and a packed "
        "batch runs the prompt once); unset, on for kto unless train.parity; false gives the "
        "shuffle (or group_by_length order) of the other methods. Wins over group_by_length",
    )
    logps_chunk_size: int = Field(1024, gt=0, description="Rows of the LM head per chunk")
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    resume: Literal["never", "auto"] = "never"
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"]
    )
    sample_prompts: list[str] = Field(default_factory=list)
    sample_max_new_tokens: int = Field(128, gt=0)
    progress: bool = True

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means "no".
        return "no" if value is False else value


class SFTConfig(Section):
    """SFT has no knobs beyond the shared ones yet; the section exists for symmetry."""


class DPOConfig(Section):
    """DPO (Rafailov et al. 2023); label_smoothing > 0 gives conservative DPO."""

    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class IPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="IPO's tau")


class HingeConfig(Section):
    beta: float = Field(0.1, gt=0)


class RobustDPOConfig(Section):
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="assumed label-flip rate")


class SimPOConfig(Section):
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0, description="target reward margin")


class ORPOConfig(Section):
    lambda_: float = Field(0.1, gt=0, alias="lambda", description="weight of the odds-ratio term")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


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


class RewardConfig(Section):
    """Reward model: Bradley-Terry loss on pairs, with an optional per-pair `margin` column
    (Llama 2) and the reward-centering term of Eisenstein et al. 2023."""

    center_coef: float = Field(0.0, ge=0, description="weight of (r_chosen + r_rejected)^2")
    use_margin: bool = Field(True, description="read a numeric per-pair `margin` column if any")


class ReferenceConfig(Section):
    """Where reference log-probs come from (DPO family and KTO)."""

    model: str | None = Field(None, description="explicit reference model; default: the start")
    mode: Literal["auto", "cache", "adapter", "copy"] = "auto"


class RunConfig(Section):
    method: Literal[METHODS] = "sft"  # type: ignore[valid-type]
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ipo: IPOConfig = Field(default_factory=IPOConfig)
    hinge: HingeConfig = Field(default_factory=HingeConfig)
    robust_dpo: RobustDPOConfig = Field(default_factory=RobustDPOConfig)
    simpo: SimPOConfig = Field(default_factory=SimPOConfig)
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.data.eval_fraction and self.data.eval_size:
            raise ValueError("data.eval_fraction and data.eval_size are exclusive: set one")
        if self.method in REFERENCE_FREE and (
            self.reference.model or self.reference.mode != "auto"
        ):
            raise ValueError(
                f"{self.method} is reference-free: remove the 'reference' section "
                "(or use dpo for a reference-based loss)"
            )
        if self.method == "reward" and (self.reference.model or self.reference.mode != "auto"):
            raise ValueError("a reward model has no reference model: remove 'reference'")
        if self.method == "ppo" and (self.reference.model or self.reference.mode != "auto"):
            raise ValueError(
                "ppo's reference is always its starting model (model.name; with LoRA the base "
                "with the adapters off): remove the 'reference' section"
            )
        if self.method == "reward" and self.train.sample_prompts:
            raise ValueError(
                "a reward model scores text, it does not generate: remove train.sample_prompts"
            )
        if self.train.group_by_prompt and self.method != "kto":
            raise ValueError(
                f"train.group_by_prompt is for kto (unpaired examples that may share a prompt); "
                f"{self.method} already runs each example's prompt once: remove it"
            )
        if self.method == "ppo" and bool(self.ppo.reward_model) == bool(self.ppo.reward_fn):
            raise ValueError(
                "ppo needs exactly one reward source: set ppo.reward_model (a reward model "
                "path or a list of them) or ppo.reward_fn ('module:function'), not both"
            )
        return self

    def method_params(self) -> dict:
        """The knobs of the chosen method as keyword arguments of its loss."""
        section = getattr(self, self.method)
        params = section.model_dump()
        if self.method == "orpo":  # the loss calls ORPO's lambda `beta`, as TRL does
            params = {"beta": params.pop("lambda_")}
        return params

    def to_yaml(self) -> str:
        """The resolved config, with only the chosen method's own section."""
        data = self.model_dump(mode="json", by_alias=True)
        for name in METHODS:
            if name != self.method:
                data.pop(name, None)
        if self.method in NO_REFERENCE:
            data.pop("reference", None)
        return yaml.safe_dump(data, sort_keys=False)


# Names users bring from transformers/TRL/peft configs, mapped to ours: spelling distance alone
# would not find `lr` from `learning_rate`.
SYNONYMS = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "load_in_4bit": "qlora",
}


def _suggest(key: str, choices: list[str]) -> str | None:
    if SYNONYMS.get(key) in choices:
        return SYNONYMS[key]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return close[0] if close else None


def _section_fields(path: tuple[Any, ...]) -> list[str]:
    """Field names valid at a dotted location, for suggestions."""
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    hint = "see examples/ for complete configs"
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            near = _suggest(str(loc[-1]), _section_fields(loc[:-1]))
            msg = f"unknown key '{key}'"
            if near:
                prefix = ".".join(str(p) for p in loc[:-1])
                msg += f"; did you mean '{prefix + '.' if prefix else ''}{near}'?"
            lines.append(msg)
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {msg}{shown}" if loc else msg)
    return ConfigError("invalid configuration:\n  " + "\n  ".join(lines), where=source, hint=hint)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' has no '='", hint="write overrides as section.key=value"
        )
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}' has no key", hint="write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start empty), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' does not exist", hint="pass the path to a YAML config"
            )
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(
                f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where
            ) from None
        except UnicodeDecodeError:
            raise ConfigError("config is not a text file", where=str(p)) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("the config must be a mapping of sections", where=str(p))
        raw = loaded
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw, by_alias=True)
    except ValidationError as err:
        raise _explain(err, source) from None
