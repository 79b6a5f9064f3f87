"""A PPO run interrupted and resumed from its checkpoint ends where an uninterrupted one does:
the trainable weights of every role, every logged metric (the adaptive KL coefficient, the prompt
order across a wrap of the data, the minibatch shuffle and the sampling RNG all feed into them),
the evaluation before and after, and the health summary."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.train.checkpoint import load_extra
from alignkit.train.loop import Interrupted
from alignkit.train.rl.ppo import PPO
from alignkit.train.run import run_training

TIMING = ("tokens_per_s", "rollout/tokens_per_s")
LAYOUTS = {  # full fine-tuning moves every weight: a smaller step keeps sampling finite
    "shared-lora": ["lora.enabled=true", "lora.r=4", "train.lr=1e-2"],
    "separate": ["lora.enabled=false", "train.lr=1e-3"],
}


def ppo_config(model_dir, data_dir, out, layout):
    return load_config(None, [
        "method=ppo", f"model.name={model_dir}", f"output_dir={out}",
        f"data.train={data_dir / 'gsm8k/train.jsonl'}", "data.limit=14", "data.eval_size=2",
        "data.column_map={question: prompt}", "ppo.reward_fn=alignkit.rewards:response_length",
        # 12 prompts, 4 per step: step 4 starts the second pass over the data
        "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=6",
        "ppo.ppo_epochs=2", "ppo.eval_prompts=2",
        # a short horizon moves the adaptive coefficient by up to 8% a step
        "ppo.kl_horizon=10", "ppo.kl_target=0.01",
        "train.max_steps=4", "train.batch_size=2", "train.eval_every=2", "train.save_every=1",
        "train.keep_checkpoints=1", "train.resume=auto", "train.progress=false",
        *LAYOUTS[layout],
    ])  # fmt: skip


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor saved under final/: the policy, the value trunk and the value head."""
    out = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        rel = f.relative_to(run_dir / "final")
        out.update({f"{rel}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def metric_rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def comparable(summary: dict) -> dict:
    keep = ("steps", "train_tokens", "eval_before", "eval_after", "kl_coef_final", "health")
    final = {k: v for k, v in summary["final"].items() if k not in TIMING}
    return {"final": final, **{k: summary[k] for k in keep}}


def summary_layout(summary: dict) -> str:
    return summary["memory"]["layout"]


def interrupt_at_call(monkeypatch, n: int) -> None:
    """Ctrl-C in the middle of the n-th PPO step, as a killed process would stop."""
    real, calls = PPO.step, {"n": 0}

    def step(self, examples, opt):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, examples, opt)

    monkeypatch.setattr(PPO, "step", step)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resumed_ppo_equals_continuous(layout, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    quiet = lambda m: None  # noqa: E731
    full_dir, cut_dir = tmp_path / "continuous", tmp_path / "resumed"
    full = run_training(ppo_config(tiny_model_dir, data_dir, full_dir, layout), log=quiet)

    interrupt_at_call(monkeypatch, 3)
    with pytest.raises(Interrupted, match="step 2/4.*step-2"):
        run_training(ppo_config(tiny_model_dir, data_dir, cut_dir, layout), log=quiet)
    monkeypatch.undo()
    ckpts = cut_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]  # keep_checkpoints=1
    at_step_2 = load_file(str(ckpts / "step-2" / "trainable.safetensors"))
    # the reference's held-out scores are stored, not resampled on resume
    assert load_extra(ckpts / "step-2")["eval_ref"]["scores"].shape == (2,)
    # a crash while writing step 3 leaves a directory without its state file: not resumed from
    (ckpts / "step-3").mkdir()
    (ckpts / "step-3" / "trainable.safetensors").write_bytes(b"partial")

    lines: list[str] = []
    resumed = run_training(ppo_config(tiny_model_dir, data_dir, cut_dir, layout), log=lines.append)
    assert any(f"resuming ppo from {ckpts / 'step-2'}, step 2/4" in x for x in lines)
    assert summary_layout(resumed) == summary_layout(full) == layout

    a, b = final_weights(full_dir), final_weights(cut_dir)
    assert a.keys() == b.keys() and len(a) > 2
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metric_rows(cut_dir) == metric_rows(full_dir)
    assert comparable(resumed) == comparable(full)
    assert (cut_dir / "health.jsonl").read_text() == (full_dir / "health.jsonl").read_text()
    # Training after the checkpoint moved the weights, and the coefficient moved every step:
    # equality above is not the trivial kind.
    final = load_file(str(ckpts / "step-3" / "trainable.safetensors"))
    assert any(not torch.equal(final[k], at_step_2[k]) for k in at_step_2)
    kl_coefs = [r["kl_coef"] for r in metric_rows(full_dir) if "kl_coef" in r]
    assert len(set(kl_coefs)) == 4


def test_ppo_interrupt_without_checkpoints_says_how_to_get_them(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    cfg = ppo_config(tiny_model_dir, data_dir, tmp_path / "run", "shared-lora")
    cfg.train.save_every = None
    interrupt_at_call(monkeypatch, 2)
    with pytest.raises(Interrupted, match="after step 1/4, with no checkpoint") as err:
        run_training(cfg, log=lambda m: None)
    assert "train.save_every" in err.value.hint


def test_ppo_refuses_a_checkpoint_another_method_wrote(tiny_model_dir, data_dir, tmp_path):
    from alignkit.errors import AlignkitError
    from alignkit.train.checkpoint import STATE_FILE

    out = tmp_path / "run"
    foreign = out / "checkpoints" / "step-1"
    foreign.mkdir(parents=True)
    (foreign / STATE_FILE).write_text(json.dumps({"step": 1}))  # e.g. from an sft run
    with pytest.raises(AlignkitError, match="not written by a ppo run"):
        run_training(ppo_config(tiny_model_dir, data_dir, out, "shared-lora"), log=lambda m: None)
