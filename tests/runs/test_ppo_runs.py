"""Whole PPO runs on a tiny model: the run directory, a reward-model run with full fine-tuning,
and the errors a run meets (a path that is not a reward model, a reward function that fails)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.errors import ConfigError, ModelError

# ------------------------------------------------------------------------- end to end

PPO_METRICS = (
    "objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
    "policy/entropy", "policy/approxkl", "policy/clipfrac", "val/vf_loss", "val/clipfrac",
    "response/length", "response/eos_fraction", "kl_coef", "loss", "learning_rate",
)  # fmt: skip


def test_tiny_end_to_end_run(tiny_model_dir, data_dir, tmp_path):
    from peft import PeftModel

    from alignkit.models import load_model
    from alignkit.train.run import run_training

    out = tmp_path / "run"
    cfg = load_config(None, [
        "method=ppo", f"model.name={tiny_model_dir}", f"output_dir={out}",
        f"data.train={data_dir / 'gsm8k/train.jsonl'}", "data.limit=14", "data.eval_size=2",
        "data.column_map={question: prompt}", "lora.enabled=true", "lora.r=4",
        "ppo.reward_fn=alignkit.rewards:response_length", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=2", "ppo.max_new_tokens=6", "ppo.ppo_epochs=1",
        "train.max_steps=2", "train.batch_size=2", "train.progress=false",
    ])  # fmt: skip
    lines: list[str] = []
    summary = run_training(cfg, log=lines.append)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for name in PPO_METRICS:
        assert all(math.isfinite(r[name]) for r in train_rows), name
    for key in ("eval/score", "eval/ref_score", "eval/win_rate"):
        assert key in summary["eval_before"] and key in summary["eval_after"]
    # before training the policy is the reference: same prompts, same seed, same scores
    assert summary["eval_before"]["eval/score"] == summary["eval_before"]["eval/ref_score"]
    assert summary["method"] == "ppo" and summary["steps"] == 2
    assert summary["health"]["checked"] > 0 and (out / "health.jsonl").is_file()
    assert summary["memory"]["layout"] == "shared-lora" and summary["peak_rss_mb"] > 0
    assert any("layout shared-lora" in line and "no copy" in line for line in lines)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final"]["kl_coef"] == summary["final"]["kl_coef"]
    final = out / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "value" / "adapter_config.json").is_file()
    assert (final / "value" / "value_head.safetensors").is_file()
    from alignkit.config import LoraConfig, ModelConfig

    base = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), for_training=False)
    assert isinstance(PeftModel.from_pretrained(base, str(final)), PeftModel)


def _tiny_run_cfg(model_dir, data_dir, out, *extra):
    return load_config(None, [
        "method=ppo", f"model.name={model_dir}", f"output_dir={out}",
        f"data.train={data_dir / 'hh-rlhf-harmless/pairs.jsonl'}", "data.limit=10",
        "data.eval_size=2", "ppo.rollout_batch_size=2", "ppo.mini_batch_size=2",
        "ppo.max_new_tokens=4", "ppo.ppo_epochs=1", "ppo.eval_prompts=2", "train.max_steps=1",
        "train.batch_size=2", "train.progress=false", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory, tokenizer):
    from conftest import tiny_llama_config
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.reward import write_reward_info

    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    model.config.architectures = ["LlamaForSequenceClassification"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_reward_info(out, mean=0.5, std=2.0)
    return str(out)


def test_run_with_a_reward_model_and_full_fine_tuning(tiny_model_dir, tiny_reward_dir,
                                                       data_dir, tmp_path):  # fmt: skip
    from alignkit.train.run import run_training

    lines: list[str] = []
    rm = f"ppo.reward_model={tiny_reward_dir}"
    cfg = _tiny_run_cfg(tiny_model_dir, data_dir, tmp_path / "run", rm, "ppo.normalize_reward=true")
    summary = run_training(cfg, log=lines.append)
    assert summary["memory"]["layout"] == "separate"
    assert set(summary["memory"]["param_mb"]) == {"policy", "reference", "value model"}
    assert any("normalised with mean 0.500 std 2.000" in line for line in lines)
    assert math.isfinite(summary["final"]["objective/scores"])
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file()
    assert (final / "value" / "model.safetensors").is_file()
    assert (final / "value" / "value_head.safetensors").is_file()


def test_run_refuses_a_path_that_is_not_a_reward_model(tiny_model_dir, data_dir, tmp_path):
    from alignkit.train.run import run_training

    cfg = _tiny_run_cfg(tiny_model_dir, data_dir, tmp_path / "run", "lora.enabled=true",
                        f"ppo.reward_model={tiny_model_dir}")  # fmt: skip
    with pytest.raises(ModelError, match="is not an alignkit/transformers reward model"):
        run_training(cfg, log=lambda m: None)


def test_run_stops_cleanly_when_the_reward_function_fails(tiny_model_dir, data_dir, tmp_path):
    from alignkit.train.run import run_training

    cfg = _tiny_run_cfg(tiny_model_dir, data_dir, tmp_path / "run", "lora.enabled=true",
                        "ppo.reward_fn=alignkit.rewards:gsm8k_answer")  # fmt: skip
    # HH rows have no 'answer' column: the reward is 0, not an error...
    run_training(cfg, log=lambda m: None)
    cfg = _tiny_run_cfg(tiny_model_dir, data_dir, tmp_path / "run2", "lora.enabled=true",
                        "ppo.reward_fn=alignkit.rewards:no_such")  # fmt: skip
    with pytest.raises(ConfigError, match="has no function 'no_such'"):  # ...a typo is
        run_training(cfg, log=lambda m: None)
