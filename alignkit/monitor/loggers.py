"""Metric loggers: JSONL always; TensorBoard, Weights & Biases and MLflow on request.

Each optional logger imports its library only when asked for, and a missing library is a clear
error naming the extra to install rather than an ImportError deep in a run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from alignkit.errors import ConfigError


class Logger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLogger:
    """`metrics.jsonl`: one object per logged step, appended and flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"train.loggers asks for {extra}, but the '{module}' package is not installed",
            hint=f"pip install 'alignkit[{extra}]' or remove it from train.loggers",
        ) from None


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Offline unless the user has configured an online W&B account (WANDB_MODE / API key)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        wandb = _require("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "alignkit"),
            dir=str(run_dir),
            config=config,
            mode=mode,
            name=run_dir.name,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class MLflowLogger:
    """A local file store in the run directory unless MLFLOW_TRACKING_URI says otherwise.

    MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; a database store
    would need the full `mlflow` package, so the light `mlflow-skinny` keeps the file store.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        mlflow = _require("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("alignkit")
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=run_dir.name)
        flat = {
            f"{s}.{k}": v
            for s, sec in config.items()
            if isinstance(sec, dict)
            for k, v in sec.items()
        }
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {
            k.replace("/", "_"): v
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
        self._mlflow.log_metrics(clean, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


class MultiLogger:
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def make_loggers(names: list[str], run_dir: Path, config: dict[str, Any]) -> MultiLogger:
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
        elif name == "wandb":
            loggers.append(WandbLogger(run_dir, config))
        elif name == "mlflow":
            loggers.append(MLflowLogger(run_dir, config))
    return MultiLogger(loggers)
