"""Shared pieces of the alignkit-vs-TRL benchmarks (``dpo_vs_trl.py``, ``kto_vs_trl.py``).

Each benchmark runs every framework in its own child process (the benchmark file run again with
``--child NAME --spec FILE``), so one framework's peak RSS never includes the other's. This module
holds what the benchmarks share: machine and version facts, peak RSS, the HH-RLHF pair selection
(parsed by alignkit, written once as conversational JSONL and given to both frameworks), alignkit's
micro-batch order, the one initial LoRA adapter both frameworks start from, the timed alignkit run,
TRL's loop timer, the child runner and the report printing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def importable_alignkit() -> None:
    """Run from a checkout without `pip install -e .`: put the repository root on sys.path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """This process's peak resident set size; Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load average -"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, {load}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


# ------------------------------------------------------------------------------------- data


def select_hh_pairs(source: Path, n: int, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """The first `n` raw HH-RLHF rows of `source` that alignkit parses into a pair and that fit
    `max_length` whichever way either framework lays them out, as conversational rows.

    A row is kept when its prompt and each response, tokenized by alignkit, satisfy
    ``prompt < max_length / 2`` and ``response + 1 < max_length / 2``: then prompt + chosen,
    prompt + rejected (DPO) and any prompt with any other row's response (KTO's mismatched KL
    rows) fit, including the one token TRL adds after each response (the newline after the
    end-of-turn token), so neither framework truncates anything. Rows whose chosen and rejected
    answer different conversations (alignkit drops those) are skipped and counted.
    """
    importable_alignkit()
    from alignkit.data.pair_formats import PromptMismatch, to_pair
    from alignkit.data.preference import tokenize_pair
    from alignkit.errors import DataError

    half = max_length // 2
    rows: list[dict[str, Any]] = []
    lengths: list[tuple[int, int, int]] = []
    skipped = {"prompt_mismatch": 0, "malformed": 0, "too_long": 0}
    with source.open(encoding="utf-8") as f:
        for line in f:
            if len(rows) == n:
                break
            if not line.strip():
                continue
            try:
                pair = to_pair(json.loads(line), "hh")
            except PromptMismatch:
                skipped["prompt_mismatch"] += 1
                continue
            except DataError:
                skipped["malformed"] += 1
                continue
            ex = tokenize_pair(pair, tokenizer, max_length=10**9, truncation="error")
            p, c, r = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
            if p >= half or max(c, r) + 1 >= half:
                skipped["too_long"] += 1
                continue
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
            lengths.append((p, c, r))
    return {"rows": rows, "lengths": lengths, "skipped": skipped}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def alignkit_order(
    n: int, batch_size: int, seed: int, prompt_groups: list[int] | None = None
) -> tuple[list[int], bool]:
    """Example indices in the order alignkit's first epoch takes them with
    ``train.group_by_length=false`` (a seeded shuffle), or by whole prompts
    (``train.group_by_prompt``) given the examples' `prompt_groups`, micro-batch after
    micro-batch; and whether every micro-batch is full (otherwise a sequential sampler's batches
    drift out of step)."""
    importable_alignkit()
    from alignkit.train.stream import MicroBatchStream

    stream = MicroBatchStream(
        [1] * n, batch_size, 1, seed, group_by_length=False, prompt_groups=prompt_groups
    )
    batches = [stream.indices(i, 0) for i in range(stream.per_epoch)]
    return [i for b in batches for i in b], all(len(b) == batch_size for b in batches)


# ----------------------------------------------------------------------------- LoRA adapter


def peft_lora_config(spec: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """The LoRA both frameworks use; task_type="SEQ_CLS" (reward models) also makes peft train
    and save the scalar `score` head whole (modules_to_save), as alignkit's reward method does."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=list(spec["target_modules"]),
        bias="none",
        task_type=task_type,
    )


def adapter_state(model) -> dict[str, Any]:
    """The LoRA tensors of a peft model, keyed as peft saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().numpy().tobytes())
    return h.hexdigest()[:16]


def make_initial_adapter(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Create the LoRA adapter once (seeded) and save its initial tensors for both frameworks."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, peft_lora_config(spec))
    state = adapter_state(model)
    save_file(state, str(out))
    b_zero = all(not v.any() for k, v in state.items() if "lora_B" in k)
    return {"tensors": len(state), "digest": digest(state), "lora_B_zero": b_zero}


def load_initial_adapter(model, path: str) -> dict[str, Any]:
    """Overwrite a freshly created peft adapter with the saved initial one, in place (so anything
    already holding the parameters sees the new values); returns digests before and after."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(path)
    own = adapter_state(model)
    if sorted(own) != sorted(saved):
        raise RuntimeError(f"adapter keys differ: {sorted(set(own) ^ set(saved))[:4]}")
    result = set_peft_model_state_dict(model, saved)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise RuntimeError(f"initial adapter not loaded: unexpected keys {unexpected[:4]}")
    after = digest(adapter_state(model))
    if after != digest(saved):
        raise RuntimeError("the initial adapter did not load: digests differ")
    return {"init_digest": after, "seeded_init_matched": digest(own) == after}


# ------------------------------------------------------------------------------- alignkit


def run_alignkit_timed(overrides: list[str], out_dir: Path, initial_adapter: str) -> dict[str, Any]:
    """`run_training` with the initial adapter loaded right after alignkit creates its LoRA, and
    timestamps: setup (tokenizer, data, model, LoRA), reference precompute, loop, the rest."""
    importable_alignkit()
    # What run_training imports lazily, imported here so setup_s counts no imports
    import accelerate  # noqa: F401

    import alignkit.models.load as load_mod
    import alignkit.monitor.loggers  # noqa: F401
    import alignkit.train.kto  # noqa: F401
    import alignkit.train.preference  # noqa: F401
    import alignkit.train.reference  # noqa: F401
    from alignkit.config import load_config
    from alignkit.train.run import run_training

    init: dict[str, Any] = {}
    original = load_mod.apply_lora

    def apply_lora_from_initial(model, cfg, *args, **kwargs):
        # alignkit has no "initial adapter" option: its LoRA is seeded (train.seed) like TRL's,
        # but after different RNG use, so both load the one saved adapter instead.
        peft_model = original(model, cfg, *args, **kwargs)
        init.update(load_initial_adapter(peft_model, initial_adapter))
        return peft_model

    load_mod.apply_lora = apply_lora_from_initial
    cfg = load_config(None, overrides)
    marks: list[tuple[str, float, float, float]] = []

    def log(message: str) -> None:
        marks.append((message, time.perf_counter(), time.process_time(), peak_rss_mb()))
        print(message, flush=True)

    t0 = time.perf_counter()
    try:
        summary = run_training(cfg, log=log)
    finally:
        load_mod.apply_lora = original
    end, cpu_end = time.perf_counter(), time.process_time()
    # run_training logs once when tokenizer, data, model and LoRA are ready, then (methods with
    # a reference) once the reference log-probs are there: the split without reaching into it
    ready = marks[0]
    ref_marks = [m for m in marks if m[0].startswith("[alignkit] reference:")]
    ref_s = ref_marks[-1][1] - ready[1] if ref_marks else 0.0
    rows = read_jsonl(out_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r and r.get("step", 0) > 0]
    loop_s = summary["wall_time_s"]
    return {
        "setup_s": ready[1] - t0,
        "ref_s": ref_s,
        "loop_s": loop_s,
        "train_s": ref_s + loop_s,  # what the ratio uses: the reference pass is training work
        "after_setup_s": end - ready[1],  # + optimizer set-up and saving final/
        "after_setup_cpu_s": cpu_end - ready[2],
        "total_s": end - t0,
        "rss_before_train_mb": ready[3],
        "peak_rss_mb": peak_rss_mb(),
        "steps": len(steps),
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r.get("grad_norm") for r in steps],
        "tokens": summary.get("train_tokens"),
        "data": summary.get("data", {}),
        "log": [m[0] for m in marks],
        **init,
    }


# ------------------------------------------------------------------------------------ TRL


def trl_loop_timer():
    """A TrainerCallback timing TRL's training loop: after optimizer and dataloader set-up."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        begin = end = cpu_begin = cpu_end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    return LoopTimer()


def trl_common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments both TRL benchmarks set the same way (see the benchmark docstrings)."""
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "num_train_epochs": 1,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": spec["max_grad_norm"],
        "optim": "adamw_torch",  # alignkit's torch.optim.AdamW
        "seed": spec["seed"],
        "data_seed": spec["seed"],
        "bf16": False,  # TRL's default is True
        "fp16": False,
        "gradient_checkpointing": False,  # TRL's default is True
        "max_length": spec["max_length"],
        "beta": spec["beta"],
        "precompute_ref_log_probs": False,
        "disable_dropout": True,
        "pad_to_multiple_of": None,
        "train_sampling_strategy": "sequential",  # the rows come in alignkit's order already
        "logging_strategy": "steps",
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def trl_result(trainer, timer, t0: float, ready: float, rss_ready: float) -> dict[str, Any]:
    end = time.perf_counter()
    history = trainer.state.log_history
    logs = [h for h in history if "loss" in h and "train_runtime" not in h]
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    return {
        "setup_s": ready - t0,
        "ref_s": None,
        "loop_s": timer.end - timer.begin,
        "train_s": timer.end - timer.begin,
        "after_setup_s": end - ready,
        "after_setup_cpu_s": timer.cpu_end - timer.cpu_begin,
        "total_s": end - t0,
        "rss_before_train_mb": rss_ready,
        "peak_rss_mb": peak_rss_mb(),
        "steps": len(logs),
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "tokens": int(tokens[-1]) if tokens else None,
    }


# --------------------------------------------------------------------------------- parent


def make_workdir(workdir: Path | None, prefix: str) -> Path:
    """The benchmark's working directory: the one given (created if missing) or a new temp one."""
    path = (workdir or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def held_settings(args: Any) -> dict[str, Any]:
    """The training settings every side-by-side benchmark holds equal, from its arguments."""
    return {
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "seed": args.seed,
        "threads": args.threads,
    }


def write_spec(args: Any, facts: dict[str, Any], workdir: Path, **method: Any) -> Path:
    """Write the children's spec: the data facts, the settings every pair benchmark holds equal
    (adapter, batch, optimiser, seed) and the method's own (`method`); print the machine."""
    spec = {
        **facts,
        "workdir": str(workdir),
        "initial_adapter": str(workdir / "initial_adapter.safetensors"),
        "target_modules": QKVO,
        **held_settings(args),
        "max_grad_norm": args.max_grad_norm,
        **method,
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"[bench] {machine()}")
    print(f"[bench] {json.dumps(versions())}")
    return spec_path


def run_children(
    script: Path, names: list[str], spec_path: Path, workdir: Path
) -> dict[str, dict[str, Any]]:
    """Run each child in turn; each alignkit child gets its own fresh reference cache."""
    results = {}
    for name in names:
        env = {"ALIGNKIT_CACHE": str(workdir / f"cache_{name}")} if name != "trl" else None
        results[name] = run_child(script, name, spec_path, workdir, env)
    return results


def print_init_digests(results: dict[str, dict[str, Any]]) -> None:
    for name, r in results.items():
        print(
            f"[bench] {name}: initial adapter {r['init_digest']} (seeded init already equal: "
            f"{r['seeded_init_matched']})"
        )


def write_results(
    workdir: Path,
    spec_path: Path,
    init: dict,
    results: dict,
    summary: dict,
    also: Path | None = None,
) -> None:
    """workdir/results.json (and `also`, when given): the spec, the machine, every child's
    result and the ratios."""
    out = {"spec": json.loads(spec_path.read_text()), "machine": machine(), "versions": versions()}
    out.update(initial_adapter=init, results=results, summary=summary)
    text = json.dumps(out, indent=2)
    (workdir / "results.json").write_text(text)
    if also:
        also.write_text(text)
    print(f"[bench] results: {workdir / 'results.json'}")


def run_child(
    script: Path, name: str, spec_path: Path, workdir: Path, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `script --child NAME --spec SPEC` (CPU only, offline), log to workdir/NAME.log, and
    return the JSON result the child wrote to workdir/NAME.json."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(env_extra or {})
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, str(script), "--child", name, "--spec", str(spec_path)]
    print(f"[bench] {name}: running (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    print(f"[bench] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((workdir / f"{name}.json").read_text())


def child_main(name: str, spec_path: str, runners: dict[str, Callable[[dict], dict]]) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = {"name": name, **runners[name](spec)}
    (Path(spec["workdir"]) / f"{name}.json").write_text(json.dumps(result, indent=2))


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def num(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def loss_diffs(a: list[float], b: list[float]) -> list[float]:
    n = min(len(a), len(b))
    return [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]


TABLE_ROWS = [
    ("reference precompute (s)", "ref_s", ".1f"),
    ("training loop (s)", "loop_s", ".1f"),
    ("train = precompute + loop (s)", "train_s", ".1f"),
    ("after setup, all of it (s)", "after_setup_s", ".1f"),
    ("  CPU time, all threads (s)", "after_setup_cpu_s", ".1f"),
    ("setup: tokenizer+data+model+LoRA (s)", "setup_s", ".1f"),
    ("peak RSS (MB)", "peak_rss_mb", ".0f"),
    ("peak RSS before training (MB)", "rss_before_train_mb", ".0f"),
    ("training RSS growth (MB)", "rss_growth_mb", ".0f"),
    ("steps", "steps", "d"),
    ("first loss", "first_loss", ".4f"),
    ("final loss", "final_loss", ".4f"),
]
RATIO_KEYS = {
    "train_s",
    "after_setup_s",
    "after_setup_cpu_s",
    "peak_rss_mb",
    "rss_growth_mb",
    "loop_s",
}


def print_report(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Print a side-by-side table (ratios of every column against `baseline`) and the per-step
    losses with |diff| against the baseline; return the ratios and loss differences."""
    for r in results.values():
        r["rss_growth_mb"] = r["peak_rss_mb"] - r["rss_before_train_mb"]
        r["first_loss"] = r["losses"][0] if r["losses"] else None
        r["final_loss"] = r["losses"][-1] if r["losses"] else None
    others = [k for k in results if k != baseline]
    names = [*others, baseline]
    head = f"{'':38s}" + "".join(f"{n:>16s}" for n in names)
    head += "".join(f"{n + '/' + baseline:>22s}" for n in others)
    print("\n" + head)
    for label, key, fmt in TABLE_ROWS:
        line = f"{label:38s}" + "".join(f"{num(results[n].get(key), fmt):>16s}" for n in names)
        if key in RATIO_KEYS:
            line += "".join(
                f"{num(div(results[o].get(key), results[baseline].get(key)), '.2f'):>22s}"
                for o in others
            )
        print(line)
    base = results[baseline]["losses"]
    print(
        f"\n{'step':>4s}"
        + "".join(f"{n:>16s}" for n in names)
        + "".join(f"{'|' + o + '-' + baseline + '|':>22s}" for o in others)
    )
    diffs = {o: loss_diffs(results[o]["losses"], base) for o in others}
    for i in range(max(len(r["losses"]) for r in results.values())):
        line = f"{i + 1:4d}"
        for n in names:
            losses = results[n]["losses"]
            line += f"{num(losses[i] if i < len(losses) else None, '.6f'):>16s}"
        for o in others:
            line += f"{num(diffs[o][i] if i < len(diffs[o]) else None, '.2e'):>22s}"
        print(line)
    summary: dict[str, Any] = {}
    for o in others:
        a, b = results[o], results[baseline]
        summary[o] = {
            "wall_time_ratio": div(a["train_s"], b["train_s"]),
            "after_setup_ratio": div(a["after_setup_s"], b["after_setup_s"]),
            "cpu_time_ratio": div(a["after_setup_cpu_s"], b["after_setup_cpu_s"]),
            "peak_rss_ratio": div(a["peak_rss_mb"], b["peak_rss_mb"]),
            "rss_growth_ratio": div(a["rss_growth_mb"], b["rss_growth_mb"]),
            "max_abs_loss_diff": max(diffs[o]) if diffs[o] else None,
            "mean_abs_loss_diff": sum(diffs[o]) / len(diffs[o]) if diffs[o] else None,
            "final_loss_diff": diffs[o][-1] if diffs[o] else None,
        }
    print()
    for o, s in summary.items():
        print(
            f"{o} / {baseline}: wall time {num(s['wall_time_ratio'], '.2f')} (precompute + loop; "
            f"everything after setup {num(s['after_setup_ratio'], '.2f')}, CPU time "
            f"{num(s['cpu_time_ratio'], '.2f')}), peak RSS {num(s['peak_rss_ratio'], '.2f')} "
            f"(growth during training {num(s['rss_growth_ratio'], '.2f')}), per-step loss "
            f"|diff| max {num(s['max_abs_loss_diff'], '.2e')} mean "
            f"{num(s['mean_abs_loss_diff'], '.2e')}"
        )
    return summary
