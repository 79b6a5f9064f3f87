"""alignkit KTO vs TRL's KTOTrainer: same model, unpaired examples, order, adapter and settings.

    python benchmarks/kto_vs_trl.py                  # 64 HH-RLHF pairs -> 128 examples, batch 4
    python benchmarks/kto_vs_trl.py --pairs 8        # a quick check
    python benchmarks/kto_vs_trl.py --trl-inputs alignkit   # TRL gets alignkit's ids and KL rows
    python benchmarks/kto_vs_trl.py --shuffled       # examples shuffled one by one, not by prompt

Child processes, one after the other (this file run with ``--child``), each reporting its own
peak RSS (``ru_maxrss``) and timings: ``alignkit`` (``method=kto`` with its defaults: each
micro-batch's rows packed into one row without padding, a prompt shared by several of them once;
the KL rows' no-grad forward continuing those prompts from their kept keys and values; reference
log-probs of every example and of its KL row precomputed once with the adapter disabled, each
prompt once, in a fresh ``ALIGNKIT_CACHE``; batches of whole prompts, a pair's two examples
together, as ``train.group_by_prompt`` does by default for KTO; with ``--shuffled``,
``train.group_by_prompt=false``) and ``trl`` (``KTOTrainer`` with ``peft_config``: the reference is
the policy with the adapter disabled, computed live at every step,
``precompute_ref_log_probs=False``); with ``--parity``, also ``parity`` (alignkit with
``train.parity=true``: padded rows, as TRL lays them out). alignkit's time is its reference
precompute plus its loop; TRL's is its loop.

The pairs, the LoRA adapter (one initial adapter loaded by both), the optimiser, the clipping and
the model settings are made equal as in ``dpo_vs_trl.py`` (see its docstring). KTO specifics:

- Data: the same pairs file as the DPO benchmark; alignkit reads the pairs and unpairs them
  itself (each pair gives its chosen reply as desirable, its rejected reply as undesirable: 2N
  examples, balanced, so both weights stay 1.0); TRL gets those same examples as conversational
  ``prompt``/``completion``/``label`` rows, in alignkit's order (a seeded shuffle of the
  prompts, or with ``--shuffled`` of the examples, ``train.group_by_length=false``), with a
  sequential sampler.
- Loss: both are ``1 - sigmoid(beta (r - z0))`` for desirable and ``1 - sigmoid(beta (z0 - r))``
  for undesirable examples, averaged over the examples of the batch, with z0 the batch mean of
  policy - reference log-probs of the mismatched (KL) rows, clamped at 0, without gradient.

What stays different, and why the per-step losses differ slightly from step 2 on: which
completion each example's KL row borrows. TRL rotates the completions by one *within each batch*
(row k of a batch takes the completion of row k - 1 of the same batch). alignkit fixes each
example's mismatched completion once at load time (``alignkit/train/kto.py``: example i takes the
completion of the next example in a seeded shuffle of the dataset whose prompt is another one), so
that the reference log-probs of the KL rows can be precomputed and cached; with ``--shuffled``
that shuffle is the batch order, so most partners of a batch of 4 come from the batch itself (the
next row instead of the previous) and the last comes from the next batch. In batches of whole
prompts TRL's rotation gives one KL row of each pair the other half's completion (same prompt:
not mismatched) where alignkit's come from other prompts. Step 1 is identical
(policy = reference, so r = z0 = 0 and every loss is 0.5); after it z0 is estimated from
different mismatched rows, a different sample of the same quantity. ``--trl-inputs alignkit``
gives TRL alignkit's token ids and alignkit's KL completions (a ``KTOTrainer`` subclass that
skips its own tokenization and rotation): the remaining difference then is numerical only.
The default (``--trl-inputs trl``) also keeps TRL's own tokenization, whose completions end with
one more token than alignkit's (the newline after ``<|im_end|>``; see ``dpo_vs_trl.py``).
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


def alignkit_overrides(spec: dict[str, Any], output_dir: str) -> list[str]:
    return [
        "method=kto",
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
        f"kto.beta={spec['beta']}",
        "kto.desirable_weight=1.0",
        "kto.undesirable_weight=1.0",
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
        f"train.group_by_prompt={str(spec['group_by_prompt']).lower()}",
        "train.log_every=1",
        "train.progress=false",
        "train.loggers=[jsonl]",
    ]


def run_alignkit(spec: dict[str, Any], parity: bool = False) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    out_dir = Path(spec["workdir"]) / ("alignkit_parity" if parity else "alignkit_run")
    overrides = alignkit_overrides(spec, str(out_dir)) + [f"train.parity={str(parity).lower()}"]
    result = common.run_alignkit_timed(overrides, out_dir, spec["initial_adapter"])
    return {"framework": "alignkit", "mode": "parity" if parity else "default", **result}


# -------------------------------------------------------------------------------------- TRL


def _token_check(dataset, ak_ids: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """How TRL's rows compare with alignkit's (same order): ids, and the KL completions."""
    prompt_same = comp_same = comp_plus_one = kl_same = 0
    extra: set[int] = set()
    longest = 0
    for row, ak in zip(dataset, ak_ids, strict=True):
        prompt_same += row["prompt_ids"] == ak["prompt_ids"]
        comp_same += row["completion_ids"] == ak["completion_ids"]
        if row["completion_ids"][:-1] == ak["completion_ids"]:
            comp_plus_one += 1
            extra.add(row["completion_ids"][-1])
        trl_kl = row["KL_completion_ids"]
        kl_same += trl_kl == ak["KL_completion_ids"] or trl_kl[:-1] == ak["KL_completion_ids"]
        n = len(row["prompt_ids"])
        longest = max(longest, n + len(row["completion_ids"]), n + len(trl_kl))
    return {
        "rows": len(ak_ids),
        "prompt_ids_equal": prompt_same,
        "completions_equal": comp_same,
        "completions_alignkit_plus_one_token": comp_plus_one,
        "extra_token_ids": sorted(extra),
        "kl_completion_same_as_alignkit": kl_same,
        "longest_row": longest,
        "fits_max_length": longest <= max_length,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """Rows that already hold prompt_ids/completion_ids/KL_completion_ids/label go in as is."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    timer = common.trl_loop_timer()
    own_inputs = spec["trl_inputs"] == "trl"
    rows = common.read_jsonl(spec["trl_data"])
    config = KTOConfig(
        **common.trl_common_args(spec, str(Path(spec["workdir"]) / "trl_run")),
        loss_type="kto",
        desirable_weight=1.0,
        undesirable_weight=1.0,
    )
    trainer = (KTOTrainer if own_inputs else PretokenizedKTOTrainer)(
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
    return {"framework": "trl", "mode": spec["trl_inputs"], **result, **init, "tokens_vs": tokens}


def run_init(spec: dict[str, Any]) -> dict[str, Any]:
    return common.make_initial_adapter(spec, Path(spec["initial_adapter"]))


RUNNERS = {
    "init": run_init,
    "alignkit": run_alignkit,
    "parity": lambda spec: run_alignkit(spec, parity=True),
    "trl": run_trl,
}


# ----------------------------------------------------------------------------------- parent


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Select and write the pairs; alignkit's examples, KL partners and order; TRL's rows."""
    common.importable_alignkit()
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.preference import load_kto_data
    from alignkit.models import load_tokenizer
    from alignkit.models.resolve import resolve_model
    from alignkit.train.kto import fit_kl_row, prompt_group_ids, with_mismatched

    model_path = resolve_model(args.model).path
    tokenizer = load_tokenizer(ModelConfig(name=model_path))
    picked = common.select_hh_pairs(args.data, args.pairs, tokenizer, args.max_length)
    pairs = picked["rows"]
    if len(pairs) < args.pairs:
        raise SystemExit(f"only {len(pairs)} pairs of {args.data} fit; asked for {args.pairs}")
    data = workdir / "pairs.jsonl"
    common.write_jsonl(pairs, data)
    # What alignkit will train on, read back from that file as alignkit reads it
    loaded = load_kto_data(
        DataConfig(train=str(data), max_length=args.max_length, truncation="error"),
        tokenizer,
        seed=args.seed,
    )
    if len(loaded.train) != 2 * len(pairs):
        raise SystemExit(f"alignkit kept {len(loaded.train)} of {2 * len(pairs)} examples")
    items = with_mismatched(loaded.train, args.seed)  # as alignkit.train.kto builds them
    # The unpaired rows in alignkit's example order: pair k gives examples 2k (chosen) and 2k+1
    unpaired = [
        {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
        for p in pairs
        for key in ("chosen", "rejected")
    ]
    for row, ex in zip(unpaired, loaded.train, strict=True):
        if row["label"] != ex.desirable:
            raise SystemExit("alignkit's unpaired examples are not in the expected order")
    groups = None if args.shuffled else prompt_group_ids(loaded.train)
    order, aligned = common.alignkit_order(len(items), args.batch_size, args.seed, groups)
    ids = []
    for i in order:
        ex, kl = items[i].example, items[i].kl_completion_ids
        kl_prompt, kl = fit_kl_row(ex.prompt_ids, kl, args.max_length)
        if kl_prompt != ex.prompt_ids:
            raise SystemExit("an alignkit KL row was cut to max_length")
        ids.append(
            {
                "prompt_ids": ex.prompt_ids,
                "completion_ids": ex.completion_ids,
                "KL_completion_ids": kl,
                "label": ex.desirable,
            }
        )
    common.write_jsonl(ids, workdir / "alignkit_ids.jsonl")
    trl_rows = ids if args.trl_inputs == "alignkit" else [unpaired[i] for i in order]
    common.write_jsonl(trl_rows, workdir / "trl_rows.jsonl")
    return {
        "model_path": model_path,
        "data": str(data),
        "alignkit_ids": str(workdir / "alignkit_ids.jsonl"),
        "trl_data": str(workdir / "trl_rows.jsonl"),
        "aligned": aligned,
        "examples": len(items),
        "skipped": picked["skipped"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alignkit alias, HF dir or hub id")
    p.add_argument("--data", type=Path, default=common.SHARED_HH, help="raw HH-RLHF pairs JSONL")
    p.add_argument("--pairs", type=int, default=64, help="pairs; KTO trains on twice as many")
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
        "--trl-inputs",
        choices=["trl", "alignkit"],
        default="trl",
        help="trl: TRL tokenizes the rows and rotates KL completions in-batch; alignkit: TRL "
        "gets alignkit's ids and KL completions",
    )
    p.add_argument("--first", choices=["alignkit", "trl"], default="alignkit")
    p.add_argument(
        "--parity",
        action="store_true",
        help="also run alignkit with train.parity=true (padded rows), after the alignkit child",
    )
    p.add_argument(
        "--shuffled",
        action="store_true",
        help="alignkit with train.group_by_prompt=false: a seeded shuffle of the examples, a "
        "pair's two in different batches (TRL gets that same order)",
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
    workdir = common.make_workdir(args.workdir, "kto_vs_trl_")
    facts = prepare(args, workdir)
    spec_path = common.write_spec(
        args,
        facts,
        workdir,
        beta=args.beta,
        trl_inputs=args.trl_inputs,
        group_by_prompt=not args.shuffled,
    )
    print(
        f"[bench] KTO, {args.model} ({facts['model_path']}), {args.pairs} HH-RLHF pairs -> "
        f"{facts['examples']} unpaired examples (skipped before them: {facts['skipped']}), batch "
        f"{args.batch_size}, one epoch, max_length {args.max_length}, LoRA r={args.lora_r} "
        f"alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on q,k,v,o, beta {args.beta:g}, "
        f"lr {args.lr:g} constant, fp32 CPU, TRL inputs: {args.trl_inputs}, order: "
        f"{'examples shuffled' if args.shuffled else 'whole prompts'}; workdir {workdir}",
        flush=True,
    )
    if not facts["aligned"]:
        print("[bench] warning: examples not a multiple of the batch size: the last one is short")
    init = common.run_child(SCRIPT, "init", spec_path, workdir)
    print(f"[bench] initial adapter: {init}")
    ours = ["alignkit", "parity"] if args.parity else ["alignkit"]
    names = ours + ["trl"] if args.first == "alignkit" else ["trl", *ours]
    results = common.run_children(SCRIPT, names, spec_path, workdir)
    results = {name: results[name] for name in [*ours, "trl"]}
    common.print_init_digests(results)
    tok = results["trl"]["tokens_vs"]
    print(
        f"[bench] TRL rows vs alignkit's: prompts equal {tok['prompt_ids_equal']}/{tok['rows']}, "
        f"completions equal {tok['completions_equal']}/{tok['rows']}, = alignkit's + one token "
        f"{tok['completions_alignkit_plus_one_token']}/{tok['rows']} (token ids "
        f"{tok['extra_token_ids']}), KL completion same as alignkit's "
        f"{tok['kl_completion_same_as_alignkit']}/{tok['rows']}, longest TRL row "
        f"{tok['longest_row']}"
    )
    summary = common.print_report(results, baseline="trl")
    common.write_results(workdir, spec_path, init, results, summary, also=args.json)


if __name__ == "__main__":
    main()
