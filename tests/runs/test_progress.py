"""Every phase a user waits on says what it is doing and how far along it is, on a terminal
and in a log file alike: the reference pass, evaluations, samples, training steps."""

from __future__ import annotations

import io
import json

import torch

from alignkit.monitor.progress import Phases, duration
from alignkit.train.reference import compute_logps
from tests.conftest import make_tiny_model
from tests.trainer_utils import make_trainer, synthetic_examples


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain(clock=None) -> tuple[Phases, io.StringIO]:
    """Phases writing to a file-like stream, as under CI, nohup or a cluster job."""
    out = io.StringIO()
    return Phases(stream=out, clock=clock or Clock()), out


def test_plain_phase_says_start_progress_and_end_with_counts_and_eta():
    clock = Clock()
    phases, out = plain(clock)
    with phases("reference log-probs", 150, "batches", "of 4") as progress:
        for _ in range(150):
            clock.now += 0.1
            progress.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "reference log-probs: 150 batches of 4"
    assert lines[1].startswith("reference log-probs: 1/150 batches  0s elapsed, eta 15s")
    assert lines[-1] == "reference log-probs: 150/150 batches in 15s"
    # about every 10% between the first and the last
    middle = [x.split(":")[1].split()[0] for x in lines[2:-1]]
    assert middle == [f"{n}/150" for n in range(15, 150, 15)]
    assert all("eta" in x for x in lines[1:-1])


def test_plain_phase_prints_every_30s_when_10_percent_takes_longer():
    clock = Clock()
    phases, out = plain(clock)
    with phases("eval", 100, "batches") as progress:
        for _ in range(8):
            clock.now += 20.0
            progress.advance()
    lines = out.getvalue().splitlines()
    # start, the first batch, then one line per 30 s (every other 20 s batch), and the end
    assert [x.split()[1] for x in lines[1:-1]] == ["1/100", "3/100", "5/100", "7/100"]
    assert lines[-1] == "eval: stopped at 8/100 batches after 2m40s"


def test_disabled_phases_print_nothing():
    out = io.StringIO()
    phases = Phases(enabled=False, stream=out)
    with phases("eval", 3) as progress:
        progress.advance(3)
        progress.note("x")
    assert out.getvalue() == ""


def test_live_bar_on_a_terminal_leaves_the_end_line():
    out = io.StringIO()
    phases = Phases(stream=out, terminal=True)
    train = phases("train", 2, "steps").start()
    with phases("eval at step 1", 2) as ev:  # joins the training bar: one live display
        ev.advance(2)
    train.update(2, {"loss": 1.5})
    train.stop()
    text = out.getvalue()
    assert "eval at step 1: 2/2 batches in" in text and "train: 2/2 steps in" in text
    assert "loss 1.5000" in text


def test_one_unit_reads_singular():
    phases, out = plain()
    with phases("eval after training", 1, "batches", "of 2") as progress:
        progress.advance()
    assert out.getvalue().splitlines()[0] == "eval after training: 1 batch of 2"


def test_duration():
    assert [duration(s) for s in (4.4, 125, 3725)] == ["4s", "2m05s", "1h02m"]
    assert duration(float("nan")) == "?"


def test_reference_pass_reports_its_batches_in_a_log():
    items = list(range(10))

    def collate(chunk):
        return {"x": torch.tensor(chunk, dtype=torch.float32)}

    def batch_logps(module, batch):
        return module(batch["x"][:, None])[:, 0]

    module, device = torch.nn.Linear(1, 1), torch.device("cpu")
    phases, out = plain()
    table = compute_logps(
        module, items, collate, batch_logps, batch_size=4, device=device, phases=phases
    )
    assert table.shape == (10, 1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "reference log-probs: 3 batches of 4"
    assert lines[-1].startswith("reference log-probs: 3/3 batches in")
    quiet = Phases(enabled=False, stream=io.StringIO())
    compute_logps(module, items, collate, batch_logps, batch_size=4, device=device, phases=quiet)
    assert quiet.console.file.getvalue() == ""


def test_trainer_evaluations_report_progress_in_a_log(tmp_path):
    args = ["train.max_steps=2", "train.batch_size=2", "train.eval_every=1"]
    evals = synthetic_examples(6, seed=3)
    trainer = make_trainer(make_tiny_model(seed=2), synthetic_examples(6), tmp_path, args, evals)
    phases, out = plain()
    trainer.fit(phases)
    text = out.getvalue()
    for label in ("eval before training", "eval at step 1", "eval after training"):
        assert f"{label}: 3 batches of 2\n" in text
        assert f"{label}: 3/3 batches in" in text
    assert "train: 2 steps\n" in text and "train: 2/2 steps in" in text


def test_trainer_is_silent_with_progress_off(tmp_path, capfd):
    # make_trainer sets train.progress=false; the default output is stderr
    evals = synthetic_examples(4, seed=3)
    args = ["train.max_steps=1", "train.batch_size=2"]
    make_trainer(make_tiny_model(seed=2), synthetic_examples(4), tmp_path, args, evals).fit()
    assert capfd.readouterr().err == ""


def pairs_config(tmp_path, tiny_model_dir, *extra):
    from alignkit.config import load_config

    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{i}."}
        for i in range(10)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return load_config(
        None,
        [
            "method=dpo",
            f"model.name={tiny_model_dir}",
            f"data.train={data}",
            "data.eval_size=4",
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=1",
            "train.batch_size=2",
            *extra,
        ],
    )


def test_dpo_run_reports_its_reference_pass_and_evaluations(
    tmp_path, tiny_model_dir, monkeypatch, capfd
):
    """On stderr, as `alignkit train` writes it, captured here as a file: not a terminal."""
    from alignkit.train.run import run_training

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    run_training(pairs_config(tmp_path, tiny_model_dir), log=lambda m: None)
    lines = capfd.readouterr().err.splitlines()
    assert "reference log-probs (train): 3 batches of 2" in lines
    assert "reference log-probs (eval): 2 batches of 2" in lines
    assert any(x.startswith("reference log-probs (train): 3/3 batches in") for x in lines)
    assert "eval before training: 2 batches of 2" in lines
    assert any(x.startswith("eval after training: 2/2 batches in") for x in lines)

    quiet = io.StringIO()
    cfg = pairs_config(tmp_path, tiny_model_dir, "train.progress=false", f"output_dir={tmp_path}/q")
    run_training(cfg, log=lambda m: None, progress_stream=quiet)
    assert quiet.getvalue() == ""
