"""alignkit SFT vs TRL's SFTTrainer: same model, data, order and settings, one run, two processes.

    python benchmarks/sft_vs_trl.py                 # 16 steps, batch 4, GSM8K, smollm2-135m
    python benchmarks/sft_vs_trl.py --steps 4 --rows 32

Each framework trains in its own child process (this file run with ``--child``), so the peak RSS
of one never includes the other's. A child prints one JSON object: setup time (tokenizer, data,
model, LoRA), the wall time of the training loop alone, peak RSS before and after training, the
tokens trained on and the per-step losses. The parent prints the ratios alignkit / TRL, both final
losses and the largest per-step loss difference (see ``benchmarks/README.md``).

What is made equal, and how:

- Model: the same HF directory, fp32, SDPA attention, no gradient checkpointing (TRL defaults to
  it: turned off), no mixed precision (TRL defaults to ``bf16=True``: turned off).
- LoRA: r, alpha, dropout on q,k,v,o,gate,up,down explicitly in both; adapters are initialised
  right after ``set_seed(seed)`` in both.
- Data: the first ``--rows`` rows of a GSM8K JSONL, question -> prompt, answer -> completion,
  rendered with the model's chat template; loss on the completion only (TRL:
  ``completion_only_loss=True`` on a conversational prompt-completion dataset; no packing, no
  padding-free), ``max_length`` 512, right padding to the longest row of each batch.
- Order: alignkit shuffles examples with a seeded RNG (``train.group_by_length=false``); TRL gets
  the rows already in that order, micro-batch by micro-batch, with a sequential sampler.
- Optimisation: AdamW (torch, not fused), constant learning rate without warmup, no weight
  decay, gradient clipping at 1.0, per-device batch and accumulation as given, same step count.
- Loss: both are the mean token NLL over the labelled tokens of the step.
- Nothing else inside the timed region: no eval, no checkpoints (alignkit saves ``final/`` after
  its loop, TRL has ``save_strategy="no"``), logging every step in both.

One difference stays with ``--trl-tokens trl`` (the default, TRL's own tokenization): TRL's
completion mask covers the whole rendered completion, ``...<|im_end|>\\n``, so it trains on one
more token per example (the newline after the end-of-turn token) than alignkit, whose mask stops
at ``<|im_end|>``. ``--trl-tokens alignkit`` hands TRL alignkit's own token ids and labels
instead, which makes the two computations identical (up to dropout RNG; ``--lora-dropout 0``
removes that too) and is the parity check for the loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMN_MAP = {"question": "prompt", "answer": "completion"}
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
BUNDLED_GSM8K = ROOT / "alignkit" / "assets" / "gsm8k" / "sample.jsonl"


def _cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------- alignkit child


def alignkit_overrides(spec: dict[str, Any], output_dir: str) -> list[str]:
    targets = ", ".join(TARGET_MODULES)
    return [
        f"output_dir={output_dir}",
        f"model.name={spec['model']}",
        "model.dtype=fp32",
        f"data.train={spec['data']}",
        "data.column_map={question: prompt, answer: completion}",
        f"data.max_length={spec['max_length']}",
        "data.packing=false",
        "data.completion_only=true",
        "lora.enabled=true",
        f"lora.r={spec['lora_r']}",
        f"lora.alpha={spec['lora_alpha']}",
        f"lora.dropout={spec['lora_dropout']}",
        f"lora.target_modules=[{targets}]",
        f"train.max_steps={spec['steps']}",
        f"train.batch_size={spec['batch_size']}",
        "train.grad_accum=1",
        f"train.lr={spec['lr']}",
        "train.weight_decay=0.0",
        "train.scheduler=constant",
        "train.warmup_steps=0",
        "train.max_grad_norm=1.0",
        f"train.seed={spec['seed']}",
        "train.mixed_precision='no'",  # quoted: bare no is YAML for false
        "train.gradient_checkpointing=false",
        "train.group_by_length=false",
        "train.log_every=1",
        "train.progress=false",
        "train.loggers=[jsonl]",
    ]


def run_alignkit(spec: dict[str, Any]) -> dict[str, Any]:
    common.importable_alignkit()
    common.set_threads(spec["threads"])
    # What run_training imports lazily, imported here so setup_s counts no imports (like TRL's)
    import accelerate  # noqa: F401

    import alignkit.models.load  # noqa: F401
    import alignkit.monitor.loggers  # noqa: F401
    import alignkit.train.sft  # noqa: F401
    from alignkit.config import load_config
    from alignkit.train.run import run_training

    out_dir = Path(spec["workdir"]) / "alignkit_run"
    cfg = load_config(None, alignkit_overrides(spec, str(out_dir)))
    ready: dict[str, float] = {}

    def log(message: str) -> None:
        # run_training logs once, after tokenizer, data, model and LoRA are ready and before the
        # loop: the split between setup and training without reaching into alignkit.
        ready.setdefault("t", time.perf_counter())
        ready.setdefault("cpu", time.process_time())
        ready.setdefault("rss", common.peak_rss_mb())
        ready.setdefault("load", os.getloadavg()[0])
        print(message, flush=True)

    t0 = time.perf_counter()
    summary = run_training(cfg, log=log)
    total = time.perf_counter() - t0
    cpu_end = time.process_time()
    load_end = os.getloadavg()[0]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r.get("step", 0) > 0]
    return {
        "framework": "alignkit",
        "setup_s": ready["t"] - t0 if ready else None,
        "train_s": summary["wall_time_s"],
        # CPU seconds of all threads from the end of setup to the return of run_training: the loop
        # plus optimizer set-up and saving final/ (a LoRA adapter: well under a second)
        "train_cpu_s": cpu_end - ready["cpu"] if ready else None,
        "total_s": total,  # setup + loop + saving final/
        "rss_before_train_mb": ready.get("rss"),
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_cuda_mb": _cuda_peak_mb(),
        "load_avg": [ready.get("load"), load_end],  # 1-minute system load, loop start and end
        "steps": len(steps),
        "tokens": summary["train_tokens"],
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r.get("grad_norm") for r in steps],
        "data": summary.get("data", {}),
    }


# ------------------------------------------------------------------------------------ TRL child


def _trl_dataset(spec: dict[str, Any], tokenizer: Any):
    """Rows in alignkit's micro-batch order: conversational prompt-completion for TRL to tokenize,
    or (``--trl-tokens alignkit``) alignkit's own token ids and labels."""
    from datasets import Dataset

    order = spec["order"]
    if spec["trl_tokens"] == "alignkit":
        common.importable_alignkit()
        from alignkit.config import DataConfig
        from alignkit.data import load_sft_data

        data_cfg = DataConfig(
            train=spec["data"], column_map=COLUMN_MAP, max_length=spec["max_length"]
        )
        examples = load_sft_data(data_cfg, tokenizer, seed=spec["seed"]).train
        return Dataset.from_list(
            [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
        )
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line]
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": rows[i]["question"]}],
                "completion": [{"role": "assistant", "content": rows[i]["answer"]}],
            }
            for i in order
        ]
    )


def trl_config(spec: dict[str, Any], output_dir: str):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        use_cpu=spec["device"] == "cpu",
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # alignkit's torch.optim.AdamW (TRL's default is the fused one)
        seed=spec["seed"],
        data_seed=spec["seed"],
        bf16=False,  # TRL's default is True
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True
        max_length=spec["max_length"],
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        assistant_only_loss=False,
        train_sampling_strategy="sequential",  # the rows come in alignkit's order already
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(spec["threads"])
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    class LoopTimer(TrainerCallback):
        """The training loop alone: after optimizer and dataloader set-up, before the end."""

        begin = end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()
            self.load_begin = os.getloadavg()[0]

        def on_train_end(self, args, state, control, **kwargs):
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.load_end = os.getloadavg()[0]

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    loaded = time.perf_counter()
    timer = LoopTimer()
    trainer = SFTTrainer(
        model=model,
        args=trl_config(spec, str(Path(spec["workdir"]) / "trl_run")),
        train_dataset=_trl_dataset(spec, tokenizer),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=spec["lora_dropout"],
            target_modules=TARGET_MODULES,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        callbacks=[timer],
    )
    ready = time.perf_counter()
    rss_ready = common.peak_rss_mb()
    trainer.train()
    total = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return {
        "framework": "trl",
        "setup_s": ready - t0,
        "load_s": loaded - t0,  # tokenizer + model; the rest of setup_s is LoRA + dataset prep
        "train_s": timer.end - timer.begin,
        "train_cpu_s": timer.cpu_end - timer.cpu_begin,
        "total_s": total,
        "rss_before_train_mb": rss_ready,
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_cuda_mb": _cuda_peak_mb(),
        "load_avg": [timer.load_begin, timer.load_end],
        "steps": len(logs),
        "tokens": int(tokens[-1]) if tokens else None,
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
    }


def child_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = (run_alignkit if name == "alignkit" else run_trl)(spec)
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------- parent


def microbatch_order(rows: int, batch_size: int, steps: int, seed: int) -> tuple[list[int], bool]:
    """The row indices alignkit's micro-batches 0..steps-1 take, flattened; and whether every
    micro-batch is full (otherwise TRL's sequential batches drift out of step with alignkit's)."""
    common.importable_alignkit()
    from alignkit.train.stream import MicroBatchStream

    stream = MicroBatchStream([1] * rows, batch_size, 1, seed, group_by_length=False)
    batches = [stream.indices(i, 0) for i in range(steps)]
    return [i for b in batches for i in b], all(len(b) == batch_size for b in batches)


def write_rows(source: Path, rows: int, dest: Path) -> int:
    lines = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n") + "\n")
            if len(lines) == rows:
                break
    dest.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def run_child(name: str, spec_path: Path, device: str) -> dict[str, Any]:
    workdir = spec_path.parent
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--spec", str(spec_path)]
    print(f"[bench] {name}: running (log: {log_path})", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    return json.loads((workdir / f"{name}.json").read_text())


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one framework: median times, largest peak memory, the first run's losses
    (seeded, so every repeat has the same ones)."""
    out = dict(runs[0])
    if len(runs) > 1:
        for key in ("train_s", "train_cpu_s", "setup_s"):
            values = [r[key] for r in runs if r.get(key) is not None]
            out[key] = statistics.median(values) if values else None
            out[f"{key}_all"] = values
        for key in ("peak_rss_mb", "rss_before_train_mb"):
            out[key] = max(r[key] for r in runs)
        out["load_avg"] = [r["load_avg"] for r in runs]
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return common.num(common.div(a, b), ".2f")


def _loads(result: dict[str, Any]) -> str:
    load = result.get("load_avg") or []
    pairs = load if load and isinstance(load[0], list) else [load]  # one pair per repeat
    return ", ".join(" -> ".join(common.num(x, ".1f") for x in pair) for pair in pairs)


def report(ak: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    n = min(len(ak["losses"]), len(trl["losses"]))
    diffs = [abs(a - t) for a, t in zip(ak["losses"][:n], trl["losses"][:n], strict=True)]
    rows = [
        ("training loop wall time (s)", "train_s", ".2f"),
        ("training loop CPU time, all threads (s)", "train_cpu_s", ".2f"),
        ("setup: tokenizer+data+model+LoRA (s)", "setup_s", ".2f"),
        ("peak RSS (MB)", "peak_rss_mb", ".0f"),
        ("peak RSS before the loop (MB)", "rss_before_train_mb", ".0f"),
        ("final loss", None, ".4f"),
        ("tokens trained (non-pad)", "tokens", "d"),
    ]
    if ak.get("peak_cuda_mb") is not None:
        rows.insert(3, ("peak CUDA memory (MB)", "peak_cuda_mb", ".0f"))
    print(f"\n{'':40s} {'alignkit':>10s} {'TRL':>10s} {'alignkit/TRL':>13s}")
    for label, key, fmt in rows:
        a = ak["losses"][-1] if key is None else ak.get(key)
        t = trl["losses"][-1] if key is None else trl.get(key)
        ratio = "" if key in (None, "tokens") else _ratio(a, t)
        print(f"{label:40s} {common.num(a, fmt):>10s} {common.num(t, fmt):>10s} {ratio:>13s}")
    print(f"\n{'step':>4s} {'alignkit loss':>14s} {'TRL loss':>10s} {'|diff|':>8s}")
    for i in range(n):
        print(f"{i + 1:4d} {ak['losses'][i]:14.4f} {trl['losses'][i]:10.4f} {diffs[i]:8.4f}")
    # Times on a shared machine depend on what else runs: show the load each loop ran under
    print(f"\n1-min load average, loop start -> end: alignkit {_loads(ak)}; TRL {_loads(trl)}")
    summary = {
        "wall_time_ratio": common.div(ak["train_s"], trl["train_s"]),
        "cpu_time_ratio": common.div(ak.get("train_cpu_s"), trl.get("train_cpu_s")),
        "peak_rss_ratio": common.div(ak["peak_rss_mb"], trl["peak_rss_mb"]),
        "final_loss_alignkit": ak["losses"][-1],
        "final_loss_trl": trl["losses"][-1],
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "step1_abs_loss_diff": diffs[0] if diffs else None,
    }
    shown = {k: common.num(v, ".2f" if k.endswith("ratio") else ".4f") for k, v in summary.items()}
    print(
        f"\nwall-time ratio {shown['wall_time_ratio']} (CPU time {shown['cpu_time_ratio']}), "
        f"peak-RSS ratio {shown['peak_rss_ratio']}, final loss {shown['final_loss_alignkit']} vs "
        f"{shown['final_loss_trl']}, max |loss diff| {shown['max_abs_loss_diff']} "
        f"(step 1: {shown['step1_abs_loss_diff']})"
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alignkit alias, HF dir or hub id")
    default_data = SHARED_GSM8K if SHARED_GSM8K.is_file() else BUNDLED_GSM8K
    p.add_argument("--data", type=Path, default=default_data, help="GSM8K-style JSONL")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=None, help="first N rows (default steps x batch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: default)")
    p.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="auto: CUDA if any")
    p.add_argument(
        "--trl-tokens",
        choices=["trl", "alignkit"],
        default="trl",
        help="trl: TRL tokenizes the chat rows itself; alignkit: TRL gets alignkit's ids/labels",
    )
    p.add_argument("--first", choices=["alignkit", "trl"], default="alignkit")
    p.add_argument(
        "--repeats", type=int, default=1, help="run both N times, alternating; median times"
    )
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temp directory")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--child", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit("--repeats and --steps must be at least 1")
    if args.child:
        child_main(args.child, args.spec)
        return
    common.importable_alignkit()
    from alignkit.models.resolve import resolve_model

    workdir = common.make_workdir(args.workdir, "sft_vs_trl_")
    rows = args.rows or args.steps * args.batch_size
    data = workdir / "train.jsonl"
    rows = write_rows(args.data, rows, data)
    order, aligned = microbatch_order(rows, args.batch_size, args.steps, args.seed)
    spec = {
        "model": args.model,
        "model_path": resolve_model(args.model).path,
        "data": str(data),
        "order": order,
        "workdir": str(workdir),
        "steps": args.steps,
        **common.held_settings(args),
        "device": args.device,
        "trl_tokens": args.trl_tokens,
    }
    print(f"[bench] {common.machine()}")
    print(f"[bench] {json.dumps(common.versions())}")
    print(
        f"[bench] {args.model} on {rows} rows of {args.data}, {args.steps} steps x batch "
        f"{args.batch_size}, max_length {args.max_length}, LoRA r={args.lora_r} "
        f"alpha={args.lora_alpha:g} dropout={args.lora_dropout:g}, lr {args.lr:g} constant, fp32, "
        f"TRL tokens: {args.trl_tokens}; workdir {workdir}",
        flush=True,
    )
    if not aligned:
        print(
            "[bench] warning: rows is not a multiple of the batch size and the run wraps around "
            "the data, so alignkit's last micro-batch of an epoch is short and TRL's batches do "
            "not line up with it: the loss curves compare different batches from there on"
        )
    names = ["alignkit", "trl"] if args.first == "alignkit" else ["trl", "alignkit"]
    runs: dict[str, list[dict[str, Any]]] = {"alignkit": [], "trl": []}
    for r in range(args.repeats):
        run_dir = workdir / f"run{r + 1}"
        run_dir.mkdir(exist_ok=True)
        run_spec = run_dir / "spec.json"
        run_spec.write_text(json.dumps({**spec, "workdir": str(run_dir)}, indent=2))
        # ABBA...: alternate which framework goes first, so a drift in machine load is shared
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_child(name, run_spec, args.device))
    results = {name: combine(found) for name, found in runs.items()}
    ak, trl = results["alignkit"], results["trl"]
    kept = ak["data"].get("kept")
    if kept is not None and kept != rows:
        print(
            f"[bench] warning: alignkit kept {kept} of {rows} rows (the rest are longer than "
            f"max_length and dropped, where TRL truncates them): row orders differ"
        )
    summary = report(ak, trl)
    out = {"spec": spec, "machine": common.machine(), "versions": common.versions()}
    out.update(**results, **summary)
    out["spec"].pop("order")
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"[bench] results: {workdir / 'results.json'}")


if __name__ == "__main__":
    main()
