"""Run health through the shared Trainer and `alignkit train` on tiny random models: the
findings file and the summary appear, and a NaN loss or an all-masked batch is reported."""

from __future__ import annotations

import json
import math

import torch

from alignkit.data import TokenizedExample
from alignkit.monitor.health import HEALTH_FILE
from tests.conftest import make_tiny_model
from tests.trainer_utils import make_trainer, synthetic_examples

ARGS = ["train.max_steps=3", "train.batch_size=2"]


def statuses(health: dict) -> dict[str, str]:
    return {r["rule"]: r["status"] for r in health["rules"]}


def test_trainer_reports_nan_loss(tmp_path):
    model = make_tiny_model(seed=1)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every hidden state, hence every log-prob
    fit = make_trainer(model, synthetic_examples(8), tmp_path / "run", ARGS).fit()
    assert math.isnan(fit.last_metrics["loss"])
    (finding,) = fit.health["findings"]
    assert finding["rule"] == "non_finite" and finding["step"] == 1
    assert finding["severity"] == "error" and "loss=nan" in finding["message"]
    lines = (tmp_path / "run" / HEALTH_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [finding]
    assert statuses(fit.health)["non_finite"] == "fired"


def test_trainer_healthy_run_lists_its_checks(tmp_path):
    fit = make_trainer(make_tiny_model(seed=2), synthetic_examples(8), tmp_path / "run", ARGS).fit()
    assert fit.health["findings"] == []
    assert (tmp_path / "run" / HEALTH_FILE).read_text() == ""
    status = statuses(fit.health)
    assert status["non_finite"] == "ok" and status["labels_all_masked"] == "ok"
    assert status["kl_above_target"] == "not applicable"
    assert fit.health["checked"] == 2
    # The SFT metric the masked-labels rule reads: labelled tokens per sequence.
    assert fit.last_metrics["target_tokens"] > 0


def test_trainer_reports_all_masked_labels(tmp_path):
    examples = [
        TokenizedExample(input_ids=e.input_ids, labels=[-100] * len(e.input_ids))
        for e in synthetic_examples(4)
    ]
    fit = make_trainer(make_tiny_model(seed=3), examples, tmp_path / "run", ARGS).fit()
    assert fit.last_metrics["target_tokens"] == 0 and fit.last_metrics["loss"] == 0.0
    (finding,) = fit.health["findings"]
    assert finding["rule"] == "labels_all_masked" and finding["step"] == 1


def test_train_command_writes_health_summary(tmp_path, tiny_model_dir):
    from alignkit.config import load_config
    from alignkit.train.run import run_training

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.progress=false",
        ],
    )
    logged: list[str] = []
    summary = run_training(cfg, log=logged.append)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["health"] == summary["health"]
    assert statuses(summary["health"])["labels_all_masked"] == "ok"
    checked = summary["health"]["checked"]
    assert f"health: {checked} rules checked, 0 findings" in "\n".join(logged)
    assert (tmp_path / "run" / HEALTH_FILE).is_file()


def test_resumed_run_rebuilds_health_from_its_metrics(tmp_path):
    from alignkit.monitor.loggers import JsonlLogger
    from alignkit.train.session import trim_metrics

    def nan_model():
        model = make_tiny_model(seed=1)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    run = tmp_path / "run"
    args = ["train.max_steps=4", "train.batch_size=2", "train.save_every=2", "train.resume=auto"]
    trainer = make_trainer(nan_model(), synthetic_examples(8), run, args)
    trainer.logger = JsonlLogger(run / "metrics.jsonl")
    trainer.fit()
    trainer.logger.close()
    continuous = (run / HEALTH_FILE).read_text()
    assert [json.loads(x)["step"] for x in continuous.splitlines()] == [1]

    # As `alignkit train` does on resume: drop rows after the checkpoint (step 2), go on.
    trim_metrics(run / "metrics.jsonl", run / "checkpoints" / "step-2")
    resumed = make_trainer(nan_model(), synthetic_examples(8), run, args)
    fit = resumed.fit()
    assert fit.state.step == 4
    # Replayed, not forgotten: the NaN seen at step 1 is neither lost nor reported again.
    assert (run / HEALTH_FILE).read_text() == continuous
    assert [f["step"] for f in fit.health["findings"]] == [1]
