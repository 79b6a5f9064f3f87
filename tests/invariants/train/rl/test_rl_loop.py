"""The rollout loop runs any algorithm that implements its interface: a toy one (no language
model) trains, checkpoints, and resumes to the same result as an uninterrupted run."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from alignkit.config import load_config
from alignkit.methods import TABLE
from alignkit.train.loop import Interrupted
from alignkit.train.rl.loop import PromptStream, RolloutRun, rollout_steps
from alignkit.train.run import LOOPS
from alignkit.train.session import prepare_run_dir


class Toy:
    """Regresses a linear model on noise: each step draws from the global RNG (restored from a
    checkpoint) and keeps a counter as its own checkpoint state."""

    layout, describe, param_mb = "toy", "[alignkit] toy", {"policy": 0.0}

    def __init__(self, stop_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.count, self.calls, self.stop_at = 0, 0, stop_at

    def trainable(self):
        return self.model

    def updates_per_step(self):
        return 2

    def step(self, examples, opt):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        x = torch.tensor([[float(e), 1.0, -1.0] for e in examples])
        for _ in range(2):
            loss = ((self.model(x) - torch.randn(len(examples), 1)) ** 2).mean()
            opt.backward(loss)
            opt.clip(1.0)
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad()
        self.count += 1
        return {"loss": loss.item(), "tokens": len(examples)}

    def evaluate(self, prompts):
        return {"eval/score": self.model.weight.sum().item()}

    def policy(self):
        return contextlib.nullcontext(self.model)

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def save_final(self, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), out_dir / "toy.pt")

    def summary_extras(self):
        return {"toy_steps": self.count}


DATA = SimpleNamespace(
    train=list(range(6)),
    eval=[0, 1, 2],
    format="toy",
    stats=SimpleNamespace(dropped_too_long=0, truncated=0),
)


def run_toy(run_dir, algo, log=lambda m: None):
    cfg = load_config(None, [
        "method=ppo", "ppo.reward_fn=alignkit.rewards:response_length", f"output_dir={run_dir}",
        "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.eval_prompts=2",
        "train.max_steps=4", "train.eval_every=2", "train.save_every=1", "train.resume=auto",
        "train.progress=false", "train.lr=0.1",
    ])  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    prepare_run_dir(cfg, True)
    run = RolloutRun(cfg, cfg.ppo, algo, None, Accelerator(cpu=True), run_dir, log)
    return run.run(DATA)


def test_every_method_table_runner_has_a_loop():
    assert TABLE["ppo"].runner == "rollout" and TABLE["dpo"].runner == "offline"
    assert {row.runner for row in TABLE.values()} <= set(LOOPS) == {"offline", "rollout"}


def test_prompt_stream_reshuffles_each_pass():
    stream = PromptStream(5, 3, seed=1)
    first, second = stream.next(), stream.next()
    assert len(set(first + second[:2])) == 5  # one pass covers every prompt once
    assert stream.pos == 6
    tcfg = SimpleNamespace(max_steps=None, epochs=2.0)
    assert rollout_steps(tcfg, 10, 4) == 5


def test_toy_algorithm_resumes_to_the_continuous_run(tmp_path):
    full = run_toy(tmp_path / "full", Toy())
    assert full["steps"] == 4 and full["toy_steps"] == 4 and full["memory"]["layout"] == "toy"
    assert set(full["eval_before"]) == set(full["eval_after"]) == {"eval/score"}

    with pytest.raises(Interrupted, match="after step 2/4; the last checkpoint is .*step-2"):
        run_toy(tmp_path / "cut", Toy(stop_at=3))
    lines: list[str] = []
    resumed = run_toy(tmp_path / "cut", Toy(), log=lines.append)
    assert any("resuming ppo from" in x and "step 2/4" in x for x in lines)
    assert resumed["toy_steps"] == 4  # 2 restored from the checkpoint + 2 run
    for key in ("final", "eval_before", "eval_after", "train_tokens"):
        assert resumed[key] == full[key], key
    rows = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("full", "cut")]
    # the eval before training at step 0, then steps 1-4, the last with the eval after it
    assert rows[0] == rows[1]
    assert [json.loads(x)["step"] for x in rows[0].splitlines()] == [0, 1, 2, 3, 4]
    assert "eval/score" in json.loads(rows[0].splitlines()[-1])
    a, b = (torch.load(tmp_path / d / "final" / "toy.pt") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["toy_steps"] == 4


def test_evaluations_and_steps_report_progress_in_a_log(tmp_path):
    import io

    from alignkit.monitor.progress import Phases

    cfg = load_config(None, [
        "method=ppo", "ppo.reward_fn=alignkit.rewards:response_length", f"output_dir={tmp_path}",
        "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.eval_prompts=2",
        "train.max_steps=2", "train.eval_every=1",
    ])  # fmt: skip
    prepare_run_dir(cfg, True)
    out = io.StringIO()
    acc = Accelerator(cpu=True)
    RolloutRun(cfg, cfg.ppo, Toy(), None, acc, tmp_path, print, Phases(stream=out)).run(DATA)
    lines = out.getvalue().splitlines()
    for label in ("eval before training", "eval at step 1", "eval after training"):
        assert f"{label}: 2 prompts (policy and reference)" in lines
        assert any(x.startswith(f"{label}: 2/2 prompts in") for x in lines)
    assert "train: 2 steps" in lines and any(x.startswith("train: 2/2 steps in") for x in lines)
