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
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from alignkit.errors import ConfigError
from alignkit.knobs import (  # noqa: F401  (re-exported: the method sections)
    BetaConfig,
    DPOConfig,
    HingeConfig,
    IPOConfig,
    KTOConfig,
    ORPOConfig,
    PPOConfig,
    RewardConfig,
    RobustDPOConfig,
    Section,
    SFTConfig,
    SimPOConfig,
)
from alignkit.methods import METHODS, TABLE


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
    lr: float | None = Field(
        None, gt=0, description="unset: the method's usual rate, with LoRA or without"
    )
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


class ReferenceConfig(Section):
    """Where reference log-probs come from (DPO family and KTO)."""

    model: str | None = Field(None, description="explicit reference model; default: the start")
    mode: Literal["auto", "cache", "adapter", "copy"] = "auto"


def note(lines: list[str], line: str) -> None:
    """Add a run-log line once (a config is validated again when a field is assigned)."""
    if line not in lines:
        lines.append(line)


def read_intent(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A raw config as its writer meant it: `model: NAME` is the model's name, and a `lora`
    section is a request for LoRA unless it says `enabled: false` (`lora: true` too). Returns
    the config and one line per reading, for the run log."""
    out, said = dict(raw), []
    if isinstance(out.get("model"), str):
        out["model"] = {"name": out["model"]}
    lora = out.get("lora")
    if isinstance(lora, bool):
        out["lora"] = {"enabled": lora}
    elif isinstance(lora, dict) and lora and "enabled" not in lora:
        out["lora"] = {**lora, "enabled": True}
        keys = ", ".join(f"{k}={v}" for k, v in lora.items())
        said.append(
            f"lora: the config sets LoRA options ({keys}) without `enabled`, so LoRA adapters "
            "are trained (lora.enabled=false trains every parameter instead)"
        )
    return out, said


class RunConfigBase(Section):
    """The sections every method shares; `RunConfig` adds one section per method-table row."""

    method: Literal[METHODS] = "sft"  # type: ignore[valid-type]
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    # What was read into the config beyond what it says word for word (a lora section without
    # `enabled`, a model given as a plain name), for the run log.
    _decisions: list[str] = PrivateAttr(default_factory=list)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _read_intent(cls, data: Any, handler):
        decisions: list[str] = []
        if isinstance(data, dict):
            data, decisions = read_intent(data)
        cfg = handler(data)
        cfg._decisions[:0] = decisions
        return cfg

    @property
    def decisions(self) -> list[str]:
        """What was read into the config beyond its words, one line each, for the run log."""
        return list(self._decisions)

    @property
    def warnings(self) -> list[str]:
        """Settings far from the method's usual ones, one line each, for the run log."""
        return list(self._warnings)

    def __eq__(self, other: object) -> bool:
        # Two configs are equal when they run the same: how each was written does not count.
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    __hash__ = None  # mutable, like every pydantic model

    @model_validator(mode="after")
    def _check(self) -> RunConfigBase:
        row = TABLE[self.method]
        if self.data.eval_fraction and self.data.eval_size:
            raise ValueError("data.eval_fraction and data.eval_size are exclusive: set one")
        if not row.configurable_reference and (
            self.reference.model or self.reference.mode != "auto"
        ):
            raise ValueError(NO_REFERENCE_SECTION[row.reference].format(method=self.method))
        if row.head == "reward" and self.train.sample_prompts:
            raise ValueError(
                "a reward model scores text, it does not generate: remove train.sample_prompts"
            )
        if self.train.group_by_prompt and row.data != "unpaired":
            raise ValueError(
                f"train.group_by_prompt is for kto (unpaired examples that may share a prompt); "
                f"{self.method} already runs each example's prompt once: remove it"
            )
        self.section().check_active()
        self._choose_lr()
        return self

    def _choose_lr(self) -> None:
        """train.lr unset: the method's usual rate for LoRA or full fine-tuning (said in the run
        log); set far outside the usual range: a warning with the range, never an error."""
        how = "LoRA" if self.lora.enabled else "full fine-tuning"
        default, (low, high) = TABLE[self.method].lr.pick(self.lora.enabled)
        if self.train.lr is None:
            self.train.lr = default
            note(
                self._decisions,
                f"train.lr: not set, so {default:g}, the usual rate for {self.method} with {how}",
            )
        elif not low <= self.train.lr <= high:
            side = "above" if self.train.lr > high else "below"
            note(
                self._warnings,
                f"train.lr={self.train.lr:g} is {side} the usual range for {self.method} with "
                f"{how} ({low:g} to {high:g}; default {default:g}): "
                + (
                    "expect unstable training or a collapsed model"
                    if side == "above"
                    else "the model may barely move"
                ),
            )

    def section(self) -> Section:
        """The chosen method's own section."""
        return getattr(self, self.method)

    def method_params(self) -> dict:
        """The knobs of the chosen method as keyword arguments of its loss."""
        return self.section().loss_kwargs()

    def to_yaml(self) -> str:
        """The resolved config, with only the chosen method's own section."""
        data = self.model_dump(mode="json", by_alias=True)
        for name in METHODS:
            if name != self.method:
                data.pop(name, None)
        if not TABLE[self.method].configurable_reference:
            data.pop("reference", None)
        return yaml.safe_dump(data, sort_keys=False)


# Why a method refuses a `reference` section, by its table row's reference policy.
NO_REFERENCE_SECTION = {
    "free": "{method} is reference-free: remove the 'reference' section (or use dpo for a "
    "reference-based loss)",
    "none": "{method} has no reference model: remove 'reference'",
    "start": "{method}'s reference is always its starting model (model.name; with LoRA the base "
    "with the adapters off): remove the 'reference' section",
}

# One section per method, named after it, of the class its table row gives.
RunConfig = create_model(
    "RunConfig",
    __base__=RunConfigBase,
    __doc__="A whole run: the shared sections plus one section per method (see alignkit.methods).",
    **{row.section: (row.knobs, Field(default_factory=row.knobs)) for row in TABLE.values()},
)


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
    if isinstance(raw.get("model"), str):  # `model: NAME`, so that model.* overrides apply
        raw["model"] = {"name": raw["model"]}
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw, by_alias=True)
    except ValidationError as err:
        raise _explain(err, source) from None
