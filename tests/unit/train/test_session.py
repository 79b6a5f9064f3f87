"""The run session's cadence and interrupt messages, shared by both loops."""

import json
from types import SimpleNamespace

from alignkit.train.session import Cadence, interrupt_note, trim_metrics


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))


class Health:
    def __init__(self):
        self.seen, self.replayed = [], []

    def observe(self, step, metrics):
        self.seen.append(step)
        finding = {"rule": "r", "step": step, "severity": "warning", "message": "m", "reason": "",
                   "fix": ""}  # fmt: skip
        return [finding] if step else []

    def replay(self, rows):
        self.replayed = [r["step"] for r in rows]


def cadence(watch_evals=True, **every):
    tcfg = SimpleNamespace(eval_every=None, save_every=None, log_every=2, progress=False)
    vars(tcfg).update(every)
    return Cadence(tcfg, 6, logger=Recorder(), health=Health(), watch_evals=watch_evals)


def test_due_steps():
    c = cadence(eval_every=3, save_every=2)
    assert [s for s in range(1, 7) if c.eval_due(s)] == [3]  # the last step evaluates after
    assert [s for s in range(1, 7) if c.save_due(s)] == [2, 4]  # the last step is final/
    assert [s for s in range(1, 7) if c.log_due(s)] == [2, 4, 6]
    assert not cadence().eval_due(3)


def test_eval_rows_reach_the_monitor_only_when_watched(tmp_path):
    for watch, seen, replayed in ((True, [0, 2], [0, 2]), (False, [2], [2])):
        c = cadence(watch_evals=watch)
        c.log_eval(0, {"eval/loss": 1.0})
        c.log(2, {"loss": 1.0})
        assert [s for s, _ in c.logger.rows] == [0, 2] and c.health.seen == seen
        assert len(c.take_findings()) == 1 and c.take_findings() == []
        path = tmp_path / "metrics.jsonl"
        path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 2, 4)))
        c.resume_health(tmp_path, upto=2)
        assert c.health.replayed == replayed


def test_trim_and_interrupt_messages(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3)))
    trim_metrics(path, tmp_path / "checkpoints" / "step-2")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    # Rows out of order or sharing a step (an eval row apart from its step's training row):
    # one row per step, in step order, up to the checkpoint.
    rows = [{"step": 0, "eval/loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 1, "loss": 1.5},
            {"step": 2, "eval/loss": 1.2}, {"step": 3, "loss": 0.9}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trim_metrics(path, tmp_path / "checkpoints" / "step-2")
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 0, "eval/loss": 2.0},
        {"step": 1, "loss": 1.5},
        {"step": 2, "loss": 1.0, "eval/loss": 1.2},
    ]
    saved = interrupt_note(tmp_path, "sft", 3, 6, saved=tmp_path / "step-3")
    assert saved.message.startswith("interrupted at step 3/6; checkpoint saved to")
    none = interrupt_note(tmp_path, "ppo", 3, 6, saved=None)
    assert "no checkpoint" in none.message and "train.save_every" in none.hint
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
    last = interrupt_note(tmp_path, "ppo", 3, 6, saved=None)
    assert last.message.endswith("the last checkpoint is " + str(tmp_path / "checkpoints/step-2"))
