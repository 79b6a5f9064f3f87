"""alignkit DPO vs TRL's DPOTrainer: same model, pairs, order, initial adapter and settings.

    python benchmarks/dpo_vs_trl.py                  # 64 HH-RLHF pairs, 16 steps x batch 4
    python benchmarks/dpo_vs_trl.py --pairs 8        # a quick check
    python benchmarks/dpo_vs_trl.py --trl-tokens alignkit   # TRL trains on alignkit's token ids

Child processes, one after the other (this file run with ``--child``), each reporting its
own peak RSS (``ru_maxrss``) and timings:

- ``fast``: alignkit's defaults: one prefix-shared block per pair (prompt once, both responses
  after it), a micro-batch's blocks packed into one row without padding and attended block by
  block, reference log-probs precomputed once with the adapter disabled (a fresh
  ``ALIGNKIT_CACHE`` per run, so nothing is read from an earlier run), chunked log-probs;
- ``parity``: the same with ``train.parity=true``: the plain layout (prompt + chosen and
  prompt + rejected as two rows), reference still precomputed;
- ``trl``: ``DPOTrainer`` with ``peft_config``: its reference is the policy with the adapter
  disabled, computed live at every step (``precompute_ref_log_probs=False``, its default);
- ``fast-grouped`` (only when ``--runs`` names it): ``fast`` with alignkit's default
  ``train.group_by_length=true`` (batches of similar lengths). Its batches are not TRL's, so its
  time and memory compare, its per-step losses do not.

alignkit's time is its reference precompute plus its training loop (the precompute happens before
the loop and is part of the work); TRL's is its training loop (the reference forward is inside
it). The parent prints a table with the ratios against TRL, and both per-step loss curves with
their largest absolute difference.

What is made equal, and how:

- Model: the same HF directory (alignkit's ``smollm2-135m`` alias, resolved once), fp32, SDPA
  attention, no gradient checkpointing and no mixed precision (TRL's defaults turned off).
- Data: the first ``--pairs`` raw HH-RLHF pairs that alignkit parses (``parse_hh`` /
  ``to_pair``) and that fit ``--max-length`` in every layout with room to spare, written once as
  conversational JSONL (prompt = messages, chosen/rejected = one assistant message each); alignkit
  reads that file, TRL gets the same rows. Nothing is truncated in either (alignkit runs with
  ``data.truncation=error``; the TRL child checks its tokenized lengths).
- Order: alignkit shuffles pairs with ``train.seed`` (``train.group_by_length=false``, so the
  order does not depend on the layout); TRL gets the rows in that order and a sequential sampler
  (``train_sampling_strategy="sequential"``).
- LoRA: r, alpha, dropout 0 on q,k,v,o in both, and the same initial adapter: it is created once
  (``torch.manual_seed(seed)`` then ``get_peft_model``), saved, and loaded over the adapter each
  framework creates (alignkit has no option for an initial adapter, so the benchmark wraps
  ``alignkit.models.load.apply_lora``; TRL's is overwritten after the trainer is built, before
  its optimizer exists). Each child reports the adapter digest, and whether its own seeded
  initialisation happened to equal the saved one.
- Optimisation: AdamW (torch), constant learning rate without warmup, no weight decay,
  gradient clipping at ``--max-grad-norm`` in both, batch ``--batch-size``, no accumulation, one
  epoch.
- Loss: sigmoid DPO, beta, summed response log-probs; both average the per-pair losses over the
  pairs of the batch (alignkit: over the accumulated batch, here one micro-batch).

One difference stays with ``--trl-tokens trl`` (the default; TRL tokenizes the conversational
rows itself): TRL's response tokens are the rest of the rendered ``prompt + response``, which
ends ``<|im_end|>\\n``, so every response has one more token (the newline after the end-of-turn
token) than alignkit's, which stop at ``<|im_end|>``. The TRL child checks that this is the only
token difference. ``--trl-tokens alignkit`` gives TRL alignkit's own ids instead (a
``DPOTrainer`` subclass that skips its tokenization), which makes the computations the same.
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


def alignkit_overrides(
    spec: dict[str, Any], output_dir: str, parity: bool, grouped: bool = False
) -> list[str]:
    return [
        "method=dpo",
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
        f"dpo.beta={spec['beta']}",
        "dpo.label_smoothing=0.0",
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
        f"train.group_by_length={'true' if grouped else 'false'}",
        f"train.parity={'true' if parity else 'false'}",
        "train.log_every=1",
        "train.progress=false",
        "train.loggers=[jsonl]",
    ]


def run_alignkit(spec: dict[str, Any], parity: bool, grouped: bool = False) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    name = "parity" if parity else "fast-grouped" if grouped else "fast"
    out_dir = Path(spec["workdir"]) / f"alignkit_{name}"
    result = common.run_alignkit_timed(
        alignkit_overrides(spec, str(out_dir), parity, grouped), out_dir, spec["initial_adapter"]
    )
    return {"framework": "alignkit", "mode": name, **result}


# -------------------------------------------------------------------------------------- TRL


def _token_check(dataset, ak_ids: list[dict[str, list[int]]], max_length: int) -> dict[str, Any]:
    """How TRL's tokenization compares with alignkit's, row by row (same order)."""
    prompt_same = resp_same = resp_plus_one = 0
    extra: set[int] = set()
    longest = 0
    for row, ak in zip(dataset, ak_ids, strict=True):
        prompt_same += row["prompt_ids"] == ak["prompt_ids"]
        for key in ("chosen_ids", "rejected_ids"):
            trl_ids, own = row[key], ak[key]
            resp_same += trl_ids == own
            if trl_ids[:-1] == own:
                resp_plus_one += 1
                extra.add(trl_ids[-1])
            longest = max(longest, len(row["prompt_ids"]) + len(trl_ids))
    return {
        "rows": len(ak_ids),
        "prompt_ids_equal": prompt_same,
        "responses_equal": resp_same,
        "responses_alignkit_plus_one_token": resp_plus_one,
        "extra_token_ids": sorted(extra),
        "longest_row": longest,
        "fits_max_length": longest <= max_length,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """Rows that already hold prompt_ids/chosen_ids/rejected_ids (alignkit's) go in as is."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    timer = common.trl_loop_timer()
    own_tokens = spec["trl_tokens"] == "trl"
    rows = common.read_jsonl(spec["trl_data"])
    config = DPOConfig(
        **common.trl_common_args(spec, str(Path(spec["workdir"]) / "trl_run")),
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        truncation_mode="keep_start",
    )
    trainer = (DPOTrainer if own_tokens else PretokenizedDPOTrainer)(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.peft_lora_config(spec),
        callbacks=[timer],
    )
    init = common.load_initial_adapter(trainer.model, spec["initial_adapter"])
    ready, rss_ready = time.perf_counter(), common.peak_rss_mb()
    tokens = _token_check(
        trainer.train_dataset, common.read_jsonl(spec["alignkit_ids"]), spec["max_length"]
    )
    if not tokens["fits_max_length"]:
        raise SystemExit(f"a TRL row is longer than max_length and would be truncated: {tokens}")
    trainer.train()
    result = common.trl_result(trainer, timer, t0, ready, rss_ready)
    return {"framework": "trl", "mode": spec["trl_tokens"], **result, **init, "tokens_vs": tokens}


def run_init(spec: dict[str, Any]) -> dict[str, Any]:
    return common.make_initial_adapter(spec, Path(spec["initial_adapter"]))


RUNNERS = {
    "init": run_init,
    "fast": lambda spec: run_alignkit(spec, parity=False),
    "parity": lambda spec: run_alignkit(spec, parity=True),
    "fast-grouped": lambda spec: run_alignkit(spec, parity=False, grouped=True),
    "trl": run_trl,
}


# ----------------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Select and write the pairs, alignkit's token ids, TRL's rows in alignkit's order."""
    common.importable_alignkit()
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.preference import load_preference_data
    from alignkit.models import load_tokenizer
    from alignkit.models.resolve import resolve_model

    model_path = resolve_model(args.model).path
    tokenizer = load_tokenizer(ModelConfig(name=model_path))
    picked = common.select_hh_pairs(args.data, args.pairs, tokenizer, args.max_length)
    rows = picked["rows"]
    if len(rows) < args.pairs:
        raise SystemExit(f"only {len(rows)} pairs of {args.data} fit; asked for {args.pairs}")
    data = workdir / "pairs.jsonl"
    common.write_jsonl(rows, data)
    # What alignkit will train on, read back from that file as alignkit reads it
    loaded = load_preference_data(
        DataConfig(train=str(data), max_length=args.max_length, truncation="error"),
        tokenizer,
        seed=args.seed,
    )
    if len(loaded.train) != len(rows):
        raise SystemExit(f"alignkit kept {len(loaded.train)} of {len(rows)} pairs")
    order, aligned = common.alignkit_order(len(rows), args.batch_size, args.seed)
    ids = [
        {
            "prompt_ids": loaded.train[i].prompt_ids,
            "chosen_ids": loaded.train[i].chosen_ids,
            "rejected_ids": loaded.train[i].rejected_ids,
        }
        for i in order
    ]
    common.write_jsonl(ids, workdir / "alignkit_ids.jsonl")
    trl_rows = ids if args.trl_tokens == "alignkit" else [rows[i] for i in order]
    common.write_jsonl(trl_rows, workdir / "trl_rows.jsonl")
    lengths = picked["lengths"]
    return {
        "model_path": model_path,
        "data": str(data),
        "alignkit_ids": str(workdir / "alignkit_ids.jsonl"),
        "trl_data": str(workdir / "trl_rows.jsonl"),
        "aligned": aligned,
        "skipped": picked["skipped"],
        "plain_tokens": sum(2 * p + c + r for p, c, r in lengths),
        "shared_tokens": sum(p + c + r for p, c, r in lengths),
        "longest_plain_row": max(p + max(c, r) for p, c, r in lengths),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alignkit alias, HF dir or hub id")
    p.add_argument("--data", type=Path, default=common.SHARED_HH, help="raw HH-RLHF pairs JSONL")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
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
        help="trl: TRL tokenizes the conversational rows; alignkit: TRL gets alignkit's ids",
    )
    p.add_argument(
        "--runs",
        default="fast,parity,trl",
        help="which children to run, in this order (comma-separated: fast, parity, trl, and "
        "fast-grouped: fast with alignkit's default length-grouped batches, whose batches, so "
        "also per-step losses, differ from TRL's)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp directory")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        common.child_main(args.child, args.spec, RUNNERS)
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "trl" not in runs or any(r not in RUNNERS or r == "init" for r in runs):
        raise SystemExit(
            "--runs takes fast, parity, fast-grouped and trl (trl is the baseline, required)"
        )
    workdir = common.make_workdir(args.workdir, "dpo_vs_trl_")
    facts = prepare(args, workdir)
    spec_path = common.write_spec(
        args,
        facts,
        workdir,
        beta=args.beta,
        trl_tokens=args.trl_tokens,
    )
    print(
        f"[bench] DPO, {args.model} ({facts['model_path']}), {args.pairs} HH-RLHF pairs "
        f"(skipped before them: {facts['skipped']}), batch {args.batch_size}, one epoch, "
        f"max_length {args.max_length} (longest plain row {facts['longest_plain_row']}), LoRA "
        f"r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on q,k,v,o, "
        f"beta {args.beta:g}, lr {args.lr:g} constant, fp32 CPU, TRL tokens: {args.trl_tokens}; "
        f"tokens per epoch: plain layout {facts['plain_tokens']}, prefix-shared "
        f"{facts['shared_tokens']} (unpadded); workdir {workdir}",
        flush=True,
    )
    if not facts["aligned"]:
        print("[bench] warning: pairs is not a multiple of the batch size: the last batch is short")
    init = common.run_child(SCRIPT, "init", spec_path, workdir)
    print(f"[bench] initial adapter: {init}")
    results = common.run_children(SCRIPT, runs, spec_path, workdir)
    common.print_init_digests(results)
    tok = results["trl"]["tokens_vs"]
    print(
        f"[bench] TRL tokens vs alignkit's: prompts equal {tok['prompt_ids_equal']}/{tok['rows']}, "
        f"responses equal {tok['responses_equal']}/{2 * tok['rows']}, responses = alignkit's + one "
        f"token {tok['responses_alignkit_plus_one_token']}/{2 * tok['rows']} (token ids "
        f"{tok['extra_token_ids']}), longest TRL row {tok['longest_row']}"
    )
    summary = common.print_report(results, baseline="trl")
    common.write_results(workdir, spec_path, init, results, summary, also=args.json)


if __name__ == "__main__":
    main()
