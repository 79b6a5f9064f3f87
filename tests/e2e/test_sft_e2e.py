"""End to end: LoRA SFT of the real default model (SmolLM2-135M-Instruct) on GSM8K, on CPU.

One training run (48 problems, 2 epochs, 24 steps) is shared by the module's tests. They check
that the model changed the way SFT intends: the held-out loss falls, the end-of-turn token now
follows a finished answer, and replies take GSM8K's worked-solution form ending in `#### <number>`
and stop there. They also check that the run directory holds what the README promises and that a
merged export computes the same logits as the adapter it came from.

Short GSM8K problems (question + answer at most 400 characters, about 150 tokens with the chat
template) keep the module to a few minutes on two CPU cores; most of it is greedy generation.

Measured on this setup (CPU, seed 42): held-out loss 1.60 -> 0.96; P(end-of-turn | gold answer)
0.01 -> 0.90 on average; generations that ended 6/8 -> 7/8 and that hold `####` 2/8 -> 7/8 (the
one that did not end is a greedy repetition loop, the usual failure of a 135M model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alignkit.config import RunConfig, load_config
from alignkit.train.run import run_training

pytestmark = pytest.mark.e2e

MAX_CHARS = 400  # question + answer, in characters: short problems only
TRAIN = slice(0, 48)  # of the short problems, in file order
EVAL = slice(96, 112)  # held out: never trained on
PROMPTS = slice(112, 120)  # held out: generated before and after training
SFT_OVERRIDES = [
    "data.column_map={question: prompt, answer: completion}",
    "data.max_length=320",
    "lora.enabled=true",
    "lora.r=16",
    "lora.alpha=32",
    "train.epochs=2",
    "train.batch_size=4",
    "train.lr=5e-4",
    "train.warmup_ratio=0.05",
    "train.progress=false",
    "train.sample_max_new_tokens=200",
]


def short_gsm8k(data_dir: Path, n: int) -> list[str]:
    """The first `n` GSM8K training rows (JSON lines) whose question + answer is short."""
    out = []
    with open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if len(row["question"]) + len(row["answer"]) <= MAX_CHARS:
                out.append(line.strip())
                if len(out) == n:
                    break
    return out


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@dataclass
class Run:
    cfg: RunConfig
    dir: Path
    summary: dict
    eval_rows: list[dict]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, smollm2_dir, data_dir) -> Run:
    tmp = tmp_path_factory.mktemp("sft-e2e")
    rows = short_gsm8k(data_dir, PROMPTS.stop)
    prompts = [json.loads(r)["question"] for r in rows[PROMPTS]]
    cfg = load_config(
        None,
        [
            f"output_dir={tmp / 'run'}",
            f"data.train={write_lines(tmp / 'train.jsonl', rows[TRAIN])}",
            f"data.eval={write_lines(tmp / 'eval.jsonl', rows[EVAL])}",
            *SFT_OVERRIDES,
            f"train.sample_prompts={json.dumps(prompts)}",
        ],
    )
    assert cfg.model.name == "smollm2-135m"  # the default model
    summary = run_training(cfg, log=lambda *args, **kwargs: None)
    return Run(cfg, tmp / "run", summary, [json.loads(r) for r in rows[EVAL]])


@pytest.fixture(scope="module")
def adapter(sft_run):
    """final/ as plain peft loads it: the base named in adapter_config.json plus the adapter."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    final = sft_run.dir / "final"
    model = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(final)


@torch.no_grad()
def end_of_turn_probs(model, tokenizer, rows: list[dict]) -> list[float]:
    """P(end-of-turn token | prompt + the whole gold answer): does the model stop after it?"""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    probs = []
    for row in rows:
        chat = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
        end = int((ids[0] == eot).nonzero()[-1])  # the answer's end-of-turn token
        # (V,) the prediction for position `end`; logits_to_keep=1 skips the LM head elsewhere
        logits = model(input_ids=ids[:, :end], logits_to_keep=1).logits[0, -1]
        probs.append(float(logits.float().softmax(-1)[eot]))
    return probs


# --------------------------------------------------------------------------- the model changed


def test_heldout_loss_falls(sft_run):
    before = sft_run.summary["eval_before"]["eval/loss"]
    after = sft_run.summary["eval_after"]["eval/loss"]
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.8 * before, (before, after)


def test_end_of_turn_follows_a_finished_answer(sft_run, adapter):
    model, tokenizer = adapter
    after = end_of_turn_probs(model, tokenizer, sft_run.eval_rows)
    with model.disable_adapter():
        before = end_of_turn_probs(model, tokenizer, sft_run.eval_rows)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(before) / len(before) < 0.1, before
    assert sum(after) / len(after) > 0.7, after


def test_replies_take_the_answer_format_and_stop(sft_run):
    samples = sft_run.summary["samples"]
    n = len(samples)
    assert n == PROMPTS.stop - PROMPTS.start
    ended = sum(s["ended_after"] for s in samples)
    formatted = [s for s in samples if "####" in s["after"]]
    formatted_before = sum("####" in s["before"] for s in samples)
    shown = [(s["ended_after"], s["after"][-80:]) for s in samples]
    assert ended >= n - 2, shown
    assert len(formatted) >= n - 2 and len(formatted) >= formatted_before + 3, shown
    for s in formatted:  # the reply stops right after its answer line
        assert s["ended_after"], s["after"]
        assert s["after"].splitlines()[-1].startswith("####"), s["after"]


# --------------------------------------------------------------------------- the run directory


def test_run_directory(sft_run, smollm2_dir):
    run = sft_run.dir
    assert load_config(run / "config.yaml") == sft_run.cfg  # resolved: repeats the run

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, sft_run.summary["steps"] + 1))
    assert sft_run.summary["steps"] == 2 * 48 // 4  # 2 epochs of 48 rows, batch 4
    for r in train_rows:
        for key in ("loss", "grad_norm", "learning_rate"):
            assert math.isfinite(r[key]), r
    assert train_rows[0]["learning_rate"] > 0
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, sft_run.summary["steps"]]

    summary = json.loads((run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(sft_run.summary))
    for key in ("wall_time_s", "tokens_per_s", "peak_rss_mb", "trainable_params"):
        assert summary[key] > 0
    assert summary["data"]["kept"] == 48  # nothing dropped at max_length=320

    final = run / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert not (final / "model.safetensors").exists()  # the adapter, not a copy of the base
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == Path(smollm2_dir).resolve()


def test_merged_export_computes_the_adapter_logits(sft_run, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from alignkit.cli import app

    model, tokenizer = adapter
    assert isinstance(model, PeftModel)  # final/ is loadable by peft as it is

    merged_dir = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", str(sft_run.dir), "--merge", "--out", merged_dir])
    assert result.exit_code == 0, result.output
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not isinstance(merged, PeftModel)

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many now?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = model(**ids).logits
        got = merged(**ids).logits
    assert want.shape == got.shape
    # fp32 rounding of W + BA, carried through 30 layers, moves the largest logits (~20) by about
    # 1e-4 (measured: at most 1.2e-4, 14 of 2.2M logits above 1e-4), hence the relative part.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # The adapter is not a no-op: merging changed the base's logits.
    with torch.no_grad(), model.disable_adapter():
        base = model(**ids).logits
    assert (base - want).abs().max() > 1e-2


# --------------------------------------------------------------------------- QLoRA


def test_qlora_runs_three_steps(tmp_path, smollm2_dir, data_dir):
    train = write_lines(tmp_path / "train.jsonl", short_gsm8k(data_dir, 6))
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={train}",
            "data.column_map={question: prompt, answer: completion}",
            "data.max_length=256",
            "lora.enabled=true",
            "lora.qlora=true",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.lr=5e-4",
            "train.progress=false",
        ],
    )
    summary = run_training(cfg, log=lambda *args, **kwargs: None)
    assert summary["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert all(math.isfinite(r["grad_norm"]) for r in rows if "loss" in r)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
