"""PPO pieces: temperature log-probs, the adapter-off reference, one update step, the EOS
penalty, reward sources and their errors, prompt data. Whole runs: tests/runs/test_ppo_runs.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from alignkit.config import load_config
from alignkit.data.prompts import load_prompt_data
from alignkit.errors import AlignkitError, ConfigError, DataError, ModelError
from alignkit.rewards import final_answer, gsm8k_answer, gsm8k_format
from alignkit.rollout.sampling import Rollout, stop_mask
from alignkit.train.rl.ppo import Experience, make_experience, ppo_updates
from alignkit.train.rl.scoring import call_reward_fn, load_reward_fn, model_reward
from tests.ppo_utils import plain_optim, ppo_cfg, shared_models, toy_batch


def _full_logits(model, batch):
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    p, r = batch.prompt_len, batch.response_ids.shape[1]
    return out.logits[:, p - 1 : p - 1 + r].float()  # (B, R, V): predicts each response token


@torch.no_grad()
def test_logps_at_temperature_are_log_softmax_of_scaled_logits():
    models = shared_models(randomize_adapters=True)
    batch = toy_batch()
    for temp in (1.0, 0.7):
        got = models.policy_logps(batch, temp, with_entropy=True)
        logits = _full_logits(models.policy, batch) / temp
        want = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None])[..., 0]
        torch.testing.assert_close(got.logps, want, rtol=1e-5, atol=1e-5)
        logp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(got.entropy, -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- one update step


def _experience(models, batch, advantages):
    with torch.no_grad():
        old = models.policy_logps(batch, 0.7).logps
    zeros = torch.zeros_like(old)
    b = batch.input_ids.shape[0]
    return Experience(
        batch, old, old.clone(), zeros, advantages * batch.response_mask, zeros.clone(),
        torch.zeros(b), torch.ones(b, dtype=torch.bool),
    )  # fmt: skip


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module, key):
    return [n for n, p in module.named_parameters() if key in n and not torch.equal(before[n], p)]


def test_zero_advantage_step_leaves_every_weight_unchanged():
    models = shared_models()
    batch = toy_batch()
    exp = _experience(models, batch, torch.zeros(2, 4))
    before = _snapshot(models.trainable())
    pcfg = ppo_cfg("ppo.vf_coef=0", "ppo.ppo_epochs=2", "ppo.mini_batch_size=2")
    metrics = ppo_updates(models, exp, pcfg, 1, plain_optim(models), max_norm=1.0)
    assert _changed(before, models.trainable(), "") == []
    assert metrics["policy/clipfrac"] == 0
    assert metrics["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)


def test_nonzero_advantage_step_changes_the_policy_adapter_only():
    models = shared_models()
    batch = toy_batch()
    exp = _experience(models, batch, torch.ones(2, 4))
    before = _snapshot(models.trainable())
    pcfg = ppo_cfg("ppo.vf_coef=0", "ppo.ppo_epochs=1", "ppo.mini_batch_size=2")
    ppo_updates(models, exp, pcfg, 2, plain_optim(models), max_norm=1.0)
    trainable = models.trainable()
    assert _changed(before, trainable, ".default.")  # the policy moved
    assert _changed(before, trainable, ".value.") == []  # vf_coef 0: the value did not
    assert _changed(before, trainable, "value_head") == []
    with torch.no_grad():  # and toward the advantage: the sampled tokens got likelier
        assert (models.policy_logps(batch, 0.7).logps - exp.old_logps).sum() > 0


def test_value_loss_trains_the_value_adapter_and_head():
    models = shared_models()
    batch = toy_batch()
    exp = _experience(models, batch, torch.zeros(2, 4))
    exp.returns = torch.ones(2, 4) * batch.response_mask
    before = _snapshot(models.trainable())
    pcfg = ppo_cfg("ppo.vf_coef=0.5", "ppo.ppo_epochs=2", "ppo.mini_batch_size=2")
    ppo_updates(models, exp, pcfg, 2, plain_optim(models), max_norm=1.0)
    trainable = models.trainable()
    assert _changed(before, trainable, "value_head")
    assert _changed(before, trainable, ".value.")
    assert _changed(before, trainable, ".default.") == []  # zero advantage: policy unchanged


# ------------------------------------------------------------------------- EOS and experience


def test_stop_mask_keeps_the_stop_token_and_flags_unended():
    tokens = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask, ended = stop_mask(tokens, [2])
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert ended.tolist() == [True, False, True]


def test_eos_penalty_applied_exactly_to_responses_without_eos():
    models = shared_models()
    batch = toy_batch()
    ended = torch.tensor([False, True])  # row 0 ran to the limit, row 1 emitted EOS
    rollout = Rollout(
        batch.input_ids[:, :5], batch.attention_mask[:, :5], batch.response_ids,
        batch.response_mask, ended,
    )  # fmt: skip
    pcfg = ppo_cfg("ppo.missing_eos_penalty=2.5", "ppo.kl_coef=0.0")
    exp, metrics = make_experience(models, rollout, torch.tensor([1.0, 1.0]), pcfg, 0.0, 2)
    torch.testing.assert_close(exp.scores, torch.tensor([-1.5, 1.0]))
    assert metrics["response/eos_fraction"] == 0.5
    assert metrics["objective/raw_scores"] == 1.0
    assert metrics["objective/scores"] == pytest.approx(-0.25)
    assert metrics["response/length"] == 3.0  # 4 and 2 tokens


def test_experience_kl_is_zero_at_start_and_advantages_are_whitened():
    models = shared_models()  # lora_B = 0: policy == reference
    batch = toy_batch()
    rollout = Rollout(
        batch.input_ids[:, :5], batch.attention_mask[:, :5], batch.response_ids,
        batch.response_mask, torch.tensor([False, True]),
    )  # fmt: skip
    exp, metrics = make_experience(models, rollout, torch.tensor([1.0, 3.0]), ppo_cfg(), 0.05, 1)
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    mask = batch.response_mask.bool()
    assert exp.advantages[mask].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert exp.advantages[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (exp.advantages[~mask] == 0).all()


# ------------------------------------------------------------------------- rewards


def test_gsm8k_rewards():
    rows = [{"answer": "so...\n#### 1,200"}, {"answer": "#### 7"}, {"answer": "#### 7"}]
    responses = ["The total is #### 1200", "It is 7.", "#### 8"]
    assert gsm8k_answer([""] * 3, responses, rows) == [1.0, 0.0, 0.0]
    assert gsm8k_format([""] * 3, responses, rows) == [1.0, 0.0, 1.0]
    assert final_answer("#### $-3.5") == -3.5 and final_answer("no answer") is None


def _boom(prompts, responses, examples):
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("fn", "fragment"),
    [
        (_boom, "raised KeyError"),
        (lambda p, r, e: [1.0], "returned 1 scores for 2 responses"),
        (lambda p, r, e: None, "returned NoneType, not a sequence"),
        (lambda p, r, e: "ab", "returned str"),
        (lambda p, r, e: ["good", "bad"], "returned str for response 0, not a number"),
        (lambda p, r, e: [1.0, float("nan")], "returned nan for response 1"),
    ],
)
def test_reward_fn_errors_are_clear(fn, fragment):
    with pytest.raises(AlignkitError, match="reward function my:fn") as err:
        call_reward_fn(fn, "my:fn", ["p", "q"], ["a", "b"], [{}, {}])
    assert fragment in str(err.value)


def test_reward_fn_accepts_tensors_and_numpy_like():
    out = call_reward_fn(lambda p, r, e: torch.tensor([1, 2]), "f", ["p"] * 2, ["a"] * 2, [{}] * 2)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]))
    out = call_reward_fn(lambda p, r, e: (x for x in (0.5, 1)), "f", ["p"] * 2, ["a"] * 2, [{}] * 2)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nocolon", "not of the form module:function"),
        ("alignkit_no_such_module:f", "cannot import module"),
        ("alignkit.rewards:nope", "has no function 'nope'"),
    ],
)
def test_reward_fn_spec_errors(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_reward_fn(spec)


class _FakeScorer:
    def __init__(self, tokenizer, stats):
        self.tokenizer, self.stats, self.calls = tokenizer, stats, []

    def score(self, prompts, responses, *, batch_size=8):
        self.calls.append((prompts, responses))
        return torch.tensor([float(len(r)) for r in responses])


def _fake_reward_module(monkeypatch, scorer=None, error=None):
    module = types.ModuleType("alignkit.models.reward")

    def load_reward_models(paths, combine="mean", *, device=None):
        if error is not None:
            raise error
        return scorer

    class Ensemble:
        def __init__(self, scorers, combine, *, normalize=False):
            self.scorers, self.tokenizer, self.stats = scorers, scorers[0].tokenizer, None
            self.combine, self.normalize = combine, normalize

        def score(self, prompts, responses, *, batch_size=8):
            parts = []
            for s in self.scorers:
                x = s.score(prompts, responses)
                parts.append((x - s.stats["mean"]) / s.stats["std"] if self.normalize else x)
            return torch.stack(parts).min(0).values

    module.load_reward_models = load_reward_models
    module.load_reward_model = lambda path, device=None: scorer
    module.RewardEnsemble = Ensemble
    monkeypatch.setitem(sys.modules, "alignkit.models.reward", module)


def _examples(n):
    from alignkit.data.prompts import PromptExample

    return [PromptExample([{"role": "user", "content": f"q{i}"}], [1], {}) for i in range(n)]


def test_model_reward_normalises_with_recorded_stats(monkeypatch, tokenizer):
    scorer = _FakeScorer(tokenizer, {"mean": 2.0, "std": 4.0})
    _fake_reward_module(monkeypatch, scorer)
    cfg = load_config(None, ["method=ppo", "ppo.reward_model=rm", "ppo.normalize_reward=true"])
    source = model_reward(cfg.ppo, tokenizer, "cpu")
    torch.testing.assert_close(source(_examples(2), ["abcdef", "ab"]), torch.tensor([1.0, 0.0]))
    assert scorer.calls[0][0] == [e.messages for e in _examples(2)]  # conversations, not text


def test_ensemble_members_are_normalised_by_their_own_stats(monkeypatch, tokenizer):
    _fake_reward_module(monkeypatch, _FakeScorer(tokenizer, {"mean": 1.0, "std": 2.0}))
    cfg = load_config(None, ["method=ppo", "ppo.reward_model=[a, b]", "ppo.reward_combine=min",
                             "ppo.normalize_reward=true"])  # fmt: skip
    source = model_reward(cfg.ppo, tokenizer, "cpu")
    assert source.describe.startswith("ensemble a, b")
    torch.testing.assert_close(source(_examples(2), ["abc", "a"]), torch.tensor([1.0, 0.0]))


def test_model_reward_errors(monkeypatch, tokenizer):
    cfg = load_config(None, ["method=ppo", "ppo.reward_model=rm", "ppo.normalize_reward=true"])
    _fake_reward_module(monkeypatch, _FakeScorer(tokenizer, None))
    with pytest.raises(ConfigError, match="recorded mean and std"):
        model_reward(cfg.ppo, tokenizer, "cpu")
    _fake_reward_module(monkeypatch, error=ModelError("'rm' is not a reward model"))
    with pytest.raises(ModelError, match="not a reward model"):
        model_reward(cfg.ppo, tokenizer, "cpu")
    other = type("Tok", (), {"__len__": lambda s: 3, "eos_token_id": 0, "eos_token": "</s>",
                             "get_vocab": lambda s: {"a": 0}})()  # fmt: skip
    _fake_reward_module(monkeypatch, _FakeScorer(other, {"mean": 0.0, "std": 1.0}))
    with pytest.raises(ModelError, match="reward model's tokenizer differs"):
        model_reward(cfg.ppo, tokenizer, "cpu")


# ------------------------------------------------------------------------- config and data


def test_config_needs_exactly_one_reward_source():
    with pytest.raises(ConfigError, match="exactly one reward source"):
        load_config(None, ["method=ppo"])
    with pytest.raises(ConfigError, match="exactly one reward source"):
        load_config(None, ["method=ppo", "ppo.reward_fn=a:b", "ppo.reward_model=rm"])
    with pytest.raises(ConfigError, match="mini_batch_size cannot exceed"):
        load_config(None, ["method=ppo", "ppo.reward_fn=a:b", "ppo.mini_batch_size=32"])
    cfg = load_config(None, ["method=ppo", "ppo.reward_model=one/path"])
    assert cfg.ppo.reward_model == ["one/path"]
    assert load_config(None, ["ppo.reward_fn=a:b"]).method == "sft"  # other methods ignore it


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cfg(*overrides):
    return load_config(None, ["method=ppo", "ppo.reward_fn=alignkit.rewards:gsm8k_answer",
                              *overrides])  # fmt: skip


def test_gsm8k_prompts_with_column_map(tokenizer, data_dir):
    cfg = _cfg(f"data.train={data_dir / 'gsm8k/train.jsonl'}", "data.limit=12",
               "data.column_map={question: prompt}", "data.eval_size=2")  # fmt: skip
    data = load_prompt_data(cfg, tokenizer)
    assert data.format == "prompt_only"
    assert (len(data.train), len(data.eval)) == (10, 2)
    ex = data.train[0]
    assert ex.text == ex.row["question"] and "####" in ex.row["answer"]
    rendered = tokenizer.decode(ex.prompt_ids)
    assert rendered.endswith("<|im_start|>assistant\n") and ex.text in rendered


def test_pairs_and_messages_give_their_prompts(tokenizer, tmp_path, data_dir):
    cfg = _cfg(f"data.train={data_dir / 'hh-rlhf-harmless/pairs.jsonl'}", "data.limit=5")
    data = load_prompt_data(cfg, tokenizer)
    assert data.format == "hh" and len(data.train) == 5
    assert all(e.messages[-1]["role"] == "user" for e in data.train)
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "why?"}]}]  # fmt: skip
    data = load_prompt_data(_cfg(f"data.train={_write(tmp_path / 'm.jsonl', rows)}"), tokenizer)
    assert [e.messages for e in data.train] == [rows[0]["messages"][:1], rows[1]["messages"]]


def test_long_prompts_follow_the_truncation_policy(tokenizer, tmp_path):
    rows = [{"prompt": "short"}, {"prompt": "word " * 300}, {"prompt": "also short"}]
    path = _write(tmp_path / "p.jsonl", rows)
    base = [f"data.train={path}", "data.max_length=96", "ppo.max_new_tokens=32"]
    data = load_prompt_data(_cfg(*base), tokenizer)  # drop (the default)
    assert len(data.train) == 2 and data.stats.dropped_too_long == 1
    data = load_prompt_data(_cfg(*base, "data.truncation=truncate"), tokenizer)
    assert data.stats.truncated == 1 and max(len(e.prompt_ids) for e in data.train) == 64
    with pytest.raises(DataError, match="more than the 64") as err:
        load_prompt_data(_cfg(*base, "data.truncation=error"), tokenizer)
    assert "p.jsonl:2" in str(err.value)
    with pytest.raises(ConfigError, match="leaves no room"):
        load_prompt_data(_cfg(*base[:1], "data.max_length=32", "ppo.max_new_tokens=32"), tokenizer)


def test_data_without_prompts_is_refused(tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match="holds no prompts for PPO"):
        load_prompt_data(_cfg(f"data.train={path}"), tokenizer)
