"""Loggers write where the run directory says, offline."""

import json
import math

import pytest

from alignkit.errors import ConfigError
from alignkit.monitor import loggers as lg


def test_jsonl_and_nonfinite(tmp_path):
    logs = lg.make_loggers([], tmp_path, {})
    logs.log(1, {"loss": 0.5, "grad_norm": math.inf})
    logs.log(2, {"loss": 0.25})
    logs.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "grad_norm": "inf"}, {"step": 2, "loss": 0.25}]


def test_tensorboard_writes_events(tmp_path):
    logs = lg.make_loggers(["tensorboard"], tmp_path, {})
    logs.log(1, {"loss": 1.0, "rewards/margins": 0.1})
    logs.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = lg.make_loggers(["wandb"], tmp_path, {"train": {"lr": 1e-4}})
    logs.log(1, {"loss": 1.0})
    logs.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_mlflow_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = lg.make_loggers(["mlflow"], tmp_path, {"train": {"lr": 1e-4}})
    logs.log(3, {"loss": 2.0, "rewards/chosen": 0.5})
    logs.close()
    import mlflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["alignkit"])
    assert runs["metrics.loss"].tolist() == [2.0]
    assert runs["metrics.rewards_chosen"].tolist() == [0.5]


def test_missing_library_is_a_config_error(monkeypatch):
    monkeypatch.setattr(
        lg, "_require", lambda m, e: (_ for _ in ()).throw(ConfigError(f"'{m}' is not installed"))
    )
    with pytest.raises(ConfigError):
        lg.TensorBoardLogger.__init__(object.__new__(lg.TensorBoardLogger), None)
