"""alignkit reward modeling vs TRL's RewardTrainer: same model, pairs, order, adapter and head.

    python benchmarks/reward_vs_trl.py                   # 64 HH-RLHF pairs, batch 4, one epoch
    python benchmarks/reward_vs_trl.py --pairs 8 --heldout 4     # a quick check
    python benchmarks/reward_vs_trl.py --trl-tokens alignkit     # TRL scores alignkit's ids

Child processes, one after the other (this file run with ``--child``), each reporting its own peak
RSS (``ru_maxrss``) and timings: ``fast`` (``method=reward``, prompt run once per pair: each
pair's block [prompt, chosen, rejected], the batch's blocks packed into one unpadded row with
attention run block by block, as the DPO family does), ``parity`` (``train.parity=true``: two
plain rows per pair, TRL's layout) and ``trl`` (``RewardTrainer`` with ``peft_config``). Each
trained model then scores held-out pairs (``--heldout``, the pairs that follow the training
ones) the way its framework serves it: alignkit through ``load_reward_model(final/)``, TRL
through its own tokenization, collator and model forward. The held-out accuracy (chosen scored
above rejected) is printed for each, next to the wall-time and peak-RSS ratios and both loss
curves.

Held equal, as in ``dpo_vs_trl.py`` (see its docstring for the how):

- Model: the same sequence-classification model in fp32 (``AutoModelForSequenceClassification``,
  one label, bias-free ``score`` head), no mixed precision, no activation checkpointing (TRL's
  default is bf16 and checkpointing).
- Pairs: the first ``--pairs`` raw HH-RLHF rows that fit, converted once by alignkit and given to
  TRL as conversational ``prompt``/``chosen``/``rejected`` rows, in alignkit's shuffled order
  (``train.group_by_length=false``) with TRL's sequential sampler.
- LoRA r/alpha/dropout on q,k,v,o with ``task_type="SEQ_CLS"`` in both, so peft trains and saves the
  ``score`` head whole. One initial adapter *and head*: a seeded model is created once, its LoRA
  tensors and score weights saved, and loaded over what each framework creates.
- Optimisation: AdamW (torch), constant learning rate, no warmup, no weight decay, clipping at
  ``--max-grad-norm``, batch ``--batch-size``, no accumulation, one epoch.
- Loss: Bradley-Terry ``-log sigmoid(r_c - r_r)`` averaged over the pairs of the batch, no margin
  (HH has none; alignkit's ``reward.use_margin=false``). Centering: off in both by default (TRL's
  ``center_rewards_coefficient`` defaults to None, alignkit's ``reward.center_coef`` to 0; both add
  ``coef * (r_c + r_r)^2`` per pair); ``--center-coef`` sets it in both.

What cannot be made equal:

- **Where the score is read.** alignkit reads each row at its last real token, found from the
  attention mask: the reply's ``<|im_end|>``. transformers' sequence-classification forward, which
  TRL uses, reads the last token whose id is not ``pad_token_id``. With TRL's own tokenization
  (``--trl-tokens trl``, the default) a chat-template row ends ``<|im_end|>\\n``, so TRL scores
  the newline *after* the end-of-turn token, one position later than alignkit, on rows one token
  longer. Given alignkit's ids instead, which end in ``<|im_end|>``, TRL would treat that token as
  padding wherever pad == eos (the default model: both are ``<|im_end|>``) and score the token
  *before* it; ``--trl-tokens alignkit`` therefore also gives TRL's tokenizer a pad token that
  never occurs in the data (the first other special token), and the read positions then agree.
  The TRL child counts, row by row, how its ids and read positions compare with alignkit's.
- **Layout.** alignkit's default runs the prompt once per pair and packs the pairs without
  padding; ``parity`` is TRL's layout (two right-padded rows per pair).
- **After the loop.** alignkit scores the training pairs once more after training to record the
  reward's mean and std for PPO (``final/alignkit_reward.json``); that is after the timed loop
  but inside "after setup". TRL logs extra reward statistics at every step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------------- alignkit


def alignkit_overrides(spec: dict[str, Any], output_dir: str, parity: bool) -> list[str]:
    return [
        "method=reward",
        f"output_dir={output_dir}",
        f"model.name={spec['model_path']}",
        "model.dtype=fp32",
        f"data.train={spec['data']}",
        f"data.max_length={spec['max_length']}",
        "data.truncation=error",
        "lora.enabled=true",
        f"lora.r={spec['lora_r']}",
        f"lora.alpha={spec['lora_alpha']}",
        f"lora.dropout={spec['lora_dropout']}",
        f"lora.target_modules=[{', '.join(spec['target_modules'])}]",
        f"reward.center_coef={spec['center_coef']}",
        "reward.use_margin=false",
        "train.epochs=1",
        f"train.batch_size={spec['batch_size']}",
        "train.grad_accum=1",
        f"train.lr={spec['lr']}",
        "train.weight_decay=0.0",
        "train.scheduler=constant",
        "train.warmup_steps=0",
        f"train.max_grad_norm={spec['max_grad_norm']}",
        f"train.seed={spec['seed']}",
        "train.mixed_precision='no'",  # quoted: bare no is YAML for false
        "train.gradient_checkpointing=false",
        "train.group_by_length=false",
        f"train.parity={'true' if parity else 'false'}",
        "train.log_every=1",
        "train.progress=false",
        "train.loggers=[jsonl]",
    ]


def accuracy(chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "heldout_pairs": len(wins),
        "heldout_accuracy": sum(wins) / len(wins) if wins else None,
        "heldout_margin": sum(margins) / len(margins) if margins else None,
    }


def run_alignkit(spec: dict[str, Any], parity: bool) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    import alignkit.train.reward  # noqa: F401  (imported before timing, as common does for DPO)

    name = "parity" if parity else "fast"
    out_dir = Path(spec["workdir"]) / f"alignkit_{name}"
    result = common.run_alignkit_timed(
        alignkit_overrides(spec, str(out_dir), parity), out_dir, spec["initial_adapter"]
    )
    # Held-out pairs, scored as alignkit serves the trained model (after the peak was taken)
    from alignkit.models.reward import load_reward_model

    scorer = load_reward_model(str(out_dir / "final"), device="cpu", dtype="fp32")
    rows = common.read_jsonl(spec["heldout"])
    prompts = [r["prompt"] for r in rows]
    chosen = scorer.score(prompts, [r["chosen"][-1]["content"] for r in rows]).tolist()
    rejected = scorer.score(prompts, [r["rejected"][-1]["content"] for r in rows]).tolist()
    return {"framework": "alignkit", "mode": name, **result, **accuracy(chosen, rejected)}


# -------------------------------------------------------------------------------------- TRL


def _read_positions(ids: list[int], pad_id: int) -> int:
    """The column transformers' sequence-classification forward scores: the last non-pad id."""
    return max((i for i, t in enumerate(ids) if t != pad_id), default=-1)


def _token_check(dataset, ak_ids: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """TRL's rows and read positions against alignkit's, row by row (same order)."""
    same = plus_one = same_read = 0
    read_tokens: dict[int, int] = {}
    for row, ak in zip(dataset, ak_ids, strict=True):
        for key in ("chosen_ids", "rejected_ids"):
            trl_ids, own = row[key], ak[key]
            same += trl_ids == own
            plus_one += trl_ids[:-1] == own
            col = _read_positions(trl_ids, pad_id)
            same_read += col == len(own) - 1  # alignkit reads its row's last token
            read_tokens[trl_ids[col]] = read_tokens.get(trl_ids[col], 0) + 1
    return {
        "rows": 2 * len(ak_ids),
        "ids_equal": same,
        "ids_alignkit_plus_one_token": plus_one,
        "read_at_alignkit_position": same_read,
        "read_token_ids": read_tokens,
    }


def _unused_pad(tokenizer, rows: list[dict[str, list[int]]]) -> str:
    """A special token other than EOS that occurs in no row: a pad TRL cannot mistake."""
    seen = {t for r in rows for key in ("chosen_ids", "rejected_ids") for t in r[key]}
    for tid in tokenizer.all_special_ids:
        if tid != tokenizer.eos_token_id and tid not in seen:
            return tokenizer.convert_ids_to_tokens(tid)
    raise SystemExit("no special token is free to pad with; use --trl-tokens trl")


def _score_trl(trainer, rows: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Held-out pairs through TRL's own preparation, collator and model forward."""
    import torch
    from datasets import Dataset

    data = trainer._prepare_dataset(
        Dataset.from_list(rows), trainer.processing_class, trainer.args, "heldout"
    )
    model = trainer.model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            part = [data[i] for i in range(s, min(s + batch_size, len(data)))]
            batch = trainer.data_collator(
                [{k: ex[k] for k in ("chosen_ids", "rejected_ids")} for ex in part]
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rc, rr = torch.chunk(logits.logits.squeeze(-1), 2)  # chosen rows first, as in training
            chosen += rc.tolist()
            rejected += rr.tolist()
    return accuracy(chosen, rejected)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_path"], num_labels=1, dtype=torch.float32
    )
    ak_ids = common.read_jsonl(spec["alignkit_ids"])
    if spec["trl_tokens"] == "alignkit":
        tokenizer.pad_token = _unused_pad(tokenizer, ak_ids)
    timer = common.trl_loop_timer()
    args = common.trl_common_args(spec, str(Path(spec["workdir"]) / "trl_run"))
    for key in ("beta", "precompute_ref_log_probs"):  # preference-only arguments
        args.pop(key)
    config = RewardConfig(**args, center_rewards_coefficient=spec["center_coef"] or None)
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(common.read_jsonl(spec["trl_data"])),
        processing_class=tokenizer,
        peft_config=common.peft_lora_config(spec, "SEQ_CLS"),
        callbacks=[timer],
    )
    init = common.load_initial_adapter(trainer.model, spec["initial_adapter"])
    ready, rss_ready = time.perf_counter(), common.peak_rss_mb()
    if len(trainer.train_dataset) != len(ak_ids):
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(ak_ids)} pairs")
    tokens = _token_check(trainer.train_dataset, ak_ids, tokenizer.pad_token_id)
    trainer.train()
    result = common.trl_result(trainer, timer, t0, ready, rss_ready)
    held = common.read_jsonl(spec["trl_heldout"])
    scores = _score_trl(trainer, held, spec["batch_size"])
    out = {"framework": "trl", "mode": spec["trl_tokens"], **result, **init, "tokens_vs": tokens}
    return {**out, "pad_token": tokenizer.pad_token, **scores}


# ----------------------------------------------------------------------------- initial state


def run_init(spec: dict[str, Any]) -> dict[str, Any]:
    """One seeded reward model: LoRA tensors and the new score head, saved for both."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(spec["seed"])  # the score head is drawn while the model loads
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_path"], num_labels=1, dtype=torch.float32
    )
    model = get_peft_model(model, common.peft_lora_config(spec, "SEQ_CLS"))
    state = common.adapter_state(model)
    save_file(state, spec["initial_adapter"])
    head = [k for k in state if ".score." in k or k.endswith("score.weight")]
    if not head:
        raise SystemExit("the saved adapter holds no score head: peft did not keep it")
    b_zero = all(not v.any() for k, v in state.items() if "lora_B" in k)
    digest = common.digest(state)
    return {"tensors": len(state), "digest": digest, "head": head, "lora_B_zero": b_zero}


RUNNERS = {
    "init": run_init,
    "fast": lambda spec: run_alignkit(spec, parity=False),
    "parity": lambda spec: run_alignkit(spec, parity=True),
    "trl": run_trl,
}


# ----------------------------------------------------------------------------------- parent


def _alignkit_ids(path: Path, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """prompt + chosen and prompt + rejected ids of each pair, as alignkit's reward method reads
    them (same conversion, template and truncation policy)."""
    common.importable_alignkit()
    from alignkit.config import DataConfig
    from alignkit.data.io import read_located
    from alignkit.train.reward import build_reward_pairs

    dcfg = DataConfig(train=str(path), max_length=max_length, truncation="error")
    pairs, _, _ = build_reward_pairs(read_located(str(path)), "preference", dcfg, tokenizer, False)
    return [
        {
            "chosen_ids": p.pair.prompt_ids + p.pair.chosen_ids,
            "rejected_ids": p.pair.prompt_ids + p.pair.rejected_ids,
        }
        for p in pairs
    ]


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Select the training and held-out pairs; write them, alignkit's ids and TRL's rows."""
    common.importable_alignkit()
    from alignkit.config import ModelConfig
    from alignkit.models import load_tokenizer
    from alignkit.models.resolve import resolve_model

    model_path = resolve_model(args.model).path
    tokenizer = load_tokenizer(ModelConfig(name=model_path))
    wanted = args.pairs + args.heldout
    picked = common.select_hh_pairs(args.data, wanted, tokenizer, args.max_length)
    if len(picked["rows"]) < wanted:
        raise SystemExit(f"only {len(picked['rows'])} pairs of {args.data} fit; asked for {wanted}")
    rows, held = picked["rows"][: args.pairs], picked["rows"][args.pairs :]
    data, heldout = workdir / "pairs.jsonl", workdir / "heldout.jsonl"
    common.write_jsonl(rows, data)
    common.write_jsonl(held, heldout)
    ids = _alignkit_ids(data, tokenizer, args.max_length)
    if len(ids) != len(rows):
        raise SystemExit(f"alignkit kept {len(ids)} of {len(rows)} pairs")
    order, aligned = common.alignkit_order(len(rows), args.batch_size, args.seed)
    ordered_ids = [ids[i] for i in order]
    common.write_jsonl(ordered_ids, workdir / "alignkit_ids.jsonl")
    own = args.trl_tokens == "trl"
    common.write_jsonl([rows[i] for i in order] if own else ordered_ids, workdir / "trl_rows.jsonl")
    trl_held = held if own else _alignkit_ids(heldout, tokenizer, args.max_length)
    common.write_jsonl(trl_held, workdir / "trl_heldout.jsonl")
    lengths = picked["lengths"][: args.pairs]
    return {
        "model_path": model_path,
        "data": str(data),
        "heldout": str(heldout),
        "alignkit_ids": str(workdir / "alignkit_ids.jsonl"),
        "trl_data": str(workdir / "trl_rows.jsonl"),
        "trl_heldout": str(workdir / "trl_heldout.jsonl"),
        "aligned": aligned,
        "skipped": picked["skipped"],
        "plain_tokens": sum(2 * p + c + r for p, c, r in lengths),
        "shared_tokens": sum(p + c + r for p, c, r in lengths),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alignkit alias, HF dir or hub id")
    p.add_argument("--data", type=Path, default=common.SHARED_HH, help="raw HH-RLHF pairs JSONL")
    p.add_argument("--pairs", type=int, default=64, help="training pairs")
    p.add_argument("--heldout", type=int, default=32, help="pairs after them, scored at the end")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--center-coef", type=float, default=0.0, help="reward centering, both")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: default)")
    p.add_argument(
        "--trl-tokens",
        choices=["trl", "alignkit"],
        default="trl",
        help="trl: TRL tokenizes the conversational rows; alignkit: TRL gets alignkit's ids "
        "(and a pad token distinct from EOS, so it reads the same position)",
    )
    p.add_argument("--runs", default="fast,parity,trl", help="children to run: fast, parity, trl")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp directory")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _print_heldout(results: dict[str, dict[str, Any]]) -> None:
    print()
    for name, r in results.items():
        print(
            f"[bench] {name}: held-out accuracy {common.num(r['heldout_accuracy'], '.3f')} on "
            f"{r['heldout_pairs']} pairs (mean margin {common.num(r['heldout_margin'], '.4f')})"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        common.child_main(args.child, args.spec, RUNNERS)
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "trl" not in runs or any(r not in RUNNERS or r == "init" for r in runs):
        raise SystemExit("--runs takes fast, parity and trl (trl is the baseline, required)")
    if args.heldout < 1:
        raise SystemExit("--heldout must be at least 1")
    workdir = common.make_workdir(args.workdir, "reward_vs_trl_")
    facts = prepare(args, workdir)
    spec_path = common.write_spec(
        args,
        facts,
        workdir,
        beta=None,  # common.trl_common_args sets it; removed for RewardConfig
        center_coef=args.center_coef,
        trl_tokens=args.trl_tokens,
    )
    print(
        f"[bench] reward model, {args.model} ({facts['model_path']}), {args.pairs} HH-RLHF pairs "
        f"+ {args.heldout} held out (skipped before them: {facts['skipped']}), batch "
        f"{args.batch_size}, one epoch, max_length {args.max_length}, LoRA r={args.lora_r} "
        f"alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on q,k,v,o + score head, lr "
        f"{args.lr:g} constant, center_coef {args.center_coef:g}, fp32 CPU, TRL tokens: "
        f"{args.trl_tokens}; tokens per epoch: plain {facts['plain_tokens']}, prefix-shared "
        f"{facts['shared_tokens']} (unpadded); workdir {workdir}",
        flush=True,
    )
    if not facts["aligned"]:
        print("[bench] warning: pairs is not a multiple of the batch size: the last batch is short")
    init = common.run_child(SCRIPT, "init", spec_path, workdir)
    print(f"[bench] initial adapter and head: {init}")
    results = common.run_children(SCRIPT, runs, spec_path, workdir)
    common.print_init_digests(results)
    tok = results["trl"]["tokens_vs"]
    print(
        f"[bench] TRL rows vs alignkit's: ids equal {tok['ids_equal']}/{tok['rows']}, alignkit's "
        f"+ one token {tok['ids_alignkit_plus_one_token']}/{tok['rows']}; TRL reads the score "
        f"at alignkit's position in {tok['read_at_alignkit_position']}/{tok['rows']} rows "
        f"(token ids read: {tok['read_token_ids']}; pad {results['trl']['pad_token']!r})"
    )
    summary = common.print_report(results, baseline="trl")
    _print_heldout(results)
    for name, r in results.items():
        summary.setdefault(name, {})["heldout_accuracy"] = r["heldout_accuracy"]
    common.write_results(workdir, spec_path, init, results, summary, also=args.json)


if __name__ == "__main__":
    main()
