"""Reward models: last-token reading, save/reload, ensembles, errors for non-reward models."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import ModelError
from alignkit.models import load_model, save_final
from alignkit.models.reward import (
    REWARD_INFO,
    RewardEnsemble,
    RewardModel,
    RewardScorer,
    combine_rewards,
    last_token_index,
    load_reward_model,
    load_reward_models,
    write_reward_info,
)

PROMPTS = ["How do I boil an egg?", [{"role": "user", "content": "Say hi."}], "Name a colour."]
RESPONSES = ["Put it in boiling water for eight minutes.", "Hi!", "Blue."]


def test_last_token_index_by_hand():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padded
            [0, 0, 1, 1, 1],  # left padded
            [1, 1, 1, 1, 1],  # no padding
            [0, 1, 0, 0, 0],  # one token
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_combine_rewards_by_hand():
    scores = torch.tensor([[1.0, -2.0, 3.0], [3.0, 0.0, -1.0]])  # (K=2, N=3)
    assert combine_rewards(scores, "mean").tolist() == [2.0, -1.0, 1.0]
    assert combine_rewards(scores, "min").tolist() == [1.0, -2.0, -1.0]
    with pytest.raises(ValueError):
        combine_rewards(scores, "max")


def _perturb(model, seed: int) -> None:
    """Make every trainable weight (head, LoRA B) non-trivial, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _batch(tokenizer):
    texts = ["<|im_start|>user\nhello<|im_end|>", "<|im_start|>user\nhi there, how are you?"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_final_dir_reloads_and_scores_identically(tiny_model_dir, tokenizer, tmp_path, lora):
    model = load_model(
        ModelConfig(name=tiny_model_dir), LoraConfig(enabled=lora, r=4), head="reward"
    )
    _perturb(model, seed=1)
    ids, mask = _batch(tokenizer)
    model.eval()
    with torch.no_grad():
        expected = RewardModel(model)(ids, mask)
    save_final(model, tokenizer, tmp_path / "final")
    write_reward_info(tmp_path / "final", 0.25, 1.5)
    scorer = load_reward_model(str(tmp_path / "final"), device="cpu")
    assert scorer.stats == {"mean": 0.25, "std": 1.5}
    torch.testing.assert_close(scorer.score_ids(ids, mask), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1e-3  # the head is not zero: the comparison means something


@pytest.fixture(scope="module")
def two_reward_dirs(tmp_path_factory, tiny_model_dir, tokenizer):
    dirs = []
    for seed in (1, 2):
        model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(), head="reward")
        _perturb(model, seed)
        out = tmp_path_factory.mktemp(f"rm{seed}")
        save_final(model, tokenizer, out)
        write_reward_info(out, float(seed), 2.0 * seed)
        dirs.append(str(out))
    return dirs


def test_score_renders_like_training_and_batches_do_not_matter(two_reward_dirs):
    scorer = load_reward_model(two_reward_dirs[0], device="cpu")
    together = scorer.score(PROMPTS, RESPONSES, batch_size=8)
    one_by_one = torch.cat(
        [scorer.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    )
    assert together.shape == (3,) and together.dtype == torch.float32
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    # the ids are the chat rendering of prompt + assistant reply, ending with its end-of-turn
    ids = scorer.encode(PROMPTS[:1], RESPONSES[:1])[0]
    text = scorer.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith(RESPONSES[0] + "<|im_end|>")


def test_max_length_keeps_the_end_where_the_score_is_read(two_reward_dirs):
    scorer = load_reward_model(two_reward_dirs[0], device="cpu")
    full = scorer.encode(PROMPTS[:1], RESPONSES[:1])[0]
    cut = scorer.encode(PROMPTS[:1], RESPONSES[:1], max_length=5)[0]
    assert cut == full[-5:] and len(full) > 5
    ids = torch.tensor([cut])
    torch.testing.assert_close(
        scorer.score(PROMPTS[:1], RESPONSES[:1], max_length=5),
        scorer.score_ids(ids, torch.ones_like(ids)),
    )


def test_ensemble_mean_and_min(two_reward_dirs):
    a, b = (load_reward_model(d, device="cpu") for d in two_reward_dirs)
    sa, sb = a.score(PROMPTS, RESPONSES), b.score(PROMPTS, RESPONSES)
    assert (sa - sb).abs().max() > 1e-3
    mean = load_reward_models(two_reward_dirs, "mean", device="cpu")
    low = RewardEnsemble([a, b], "min")
    assert isinstance(mean, RewardEnsemble)
    torch.testing.assert_close(mean.score(PROMPTS, RESPONSES), (sa + sb) / 2)
    torch.testing.assert_close(low.score(PROMPTS, RESPONSES), torch.minimum(sa, sb))
    ids, mask = _batch(a.tokenizer)
    torch.testing.assert_close(
        low.score_ids(ids, mask), torch.minimum(a.score_ids(ids, mask), b.score_ids(ids, mask))
    )
    normed = RewardEnsemble([a, b], "mean", normalize=True).score(PROMPTS, RESPONSES)
    torch.testing.assert_close(normed, ((sa - 1.0) / 2.0 + (sb - 2.0) / 4.0) / 2)
    assert isinstance(load_reward_models(two_reward_dirs[:1], device="cpu"), RewardScorer)


def test_run_directory_stands_for_its_final_dir(two_reward_dirs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(two_reward_dirs[0], target_is_directory=True)
    scorer = load_reward_model(str(run), device="cpu")
    info = json.loads((run / "final" / REWARD_INFO).read_text())
    assert info["type"] == "reward"
    assert scorer.stats == {"mean": 1.0, "std": 2.0} == {k: info[k] for k in ("mean", "std")}


def test_a_causal_lm_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(ModelError, match="not an alignkit/transformers reward model") as info:
        load_reward_model(tiny_model_dir, device="cpu")
    assert "method: reward" in info.value.hint
    assert "LlamaForCausalLM" in info.value.message


def test_a_causal_lora_adapter_is_not_a_reward_model(tiny_model_dir, tokenizer, tmp_path):
    model = load_model(ModelConfig(name=tiny_model_dir), LoraConfig(enabled=True, r=4))
    save_final(model, tokenizer, tmp_path / "adapter")
    with pytest.raises(ModelError, match="not an alignkit/transformers reward model.*CAUSAL_LM"):
        load_reward_model(str(tmp_path / "adapter"), device="cpu")


def test_missing_path_and_empty_list_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_reward_model(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(ModelError, match="no reward model"):
        load_reward_models([])


def test_corrupt_reward_info_is_a_model_error(two_reward_dirs, tmp_path):
    import shutil

    copy = tmp_path / "rm"
    shutil.copytree(two_reward_dirs[0], copy)
    (copy / REWARD_INFO).write_text('{"type": "reward"}')
    with pytest.raises(ModelError, match=REWARD_INFO):
        load_reward_model(str(copy), device="cpu")
