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

METHODS = ("sft", "dpo", "ipo", "hinge", "robust_dpo", "simpo", "orpo", "kto")
PAIR_METHODS = ("dpo", "ipo", "hinge", "robust_dpo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


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
        if self.method == "sft" or self.method in REFERENCE_FREE:
            data.pop("reference", None)
        return yaml.safe_dump(data, sort_keys=False)


def _suggest(key: str, choices: list[str]) -> str | None:
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
