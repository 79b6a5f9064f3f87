"""PPO memory layouts side by side: shared-base LoRA against separate models, same settings.

    python benchmarks/ppo.py                       # smollm2-135m, GSM8K prompts, 4 PPO steps
    python benchmarks/ppo.py --steps 2 --rollout 4 --max-new-tokens 16    # a quick check

Each layout runs in its own child process (this file run again with --child LAYOUT), so one
layout's peak memory never includes the other's:

- ``shared``: policy and value are two LoRA adapters on one frozen base; the reference is that
  base with the adapters disabled (what alignkit uses with ``lora.enabled``);
- ``separate``: the same LoRA policy and value adapters, each on its own copy of the base, plus a
  third frozen copy as the reference (the classic four-model layout with a reward function).

Both start from the same weights and seed and see the same prompts; the report prints rollout
tokens/s, training tokens/s, peak RSS (and peak CUDA memory) per layout, their ratios, and the
per-step objective/kl and loss of both, which must agree closely (same computation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import importable_alignkit, machine, peak_rss_mb, set_threads, versions

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def _config(args, out_dir: str):
    from alignkit.config import load_config

    return load_config(
        None,
        [
            "method=ppo",
            f"model.name={args.model}",
            f"output_dir={out_dir}",
            f"data.train={args.data}",
            "data.column_map={question: prompt}",
            f"data.limit={args.steps * args.rollout}",
            "lora.enabled=true",
            "lora.dropout=0.0",
            "ppo.reward_fn=alignkit.rewards:gsm8k_format",
            f"ppo.rollout_batch_size={args.rollout}",
            f"ppo.mini_batch_size={args.mini_batch}",
            f"ppo.max_new_tokens={args.max_new_tokens}",
            f"ppo.ppo_epochs={args.ppo_epochs}",
            f"train.batch_size={args.mini_batch}",
            f"train.max_steps={args.steps}",
            "train.progress=false",
        ],
    )


def _separate_lora(cfg, device):
    """Policy and value adapters on two copies of the base, a third copy as the reference."""
    from alignkit.config import LoraConfig
    from alignkit.models import load_model
    from alignkit.train.forward import unwrap_hf
    from alignkit.train.rl.ppo_models import PPOModels, new_value_head

    policy = load_model(cfg.model, cfg.lora, device=device)
    value = load_model(cfg.model, cfg.lora, device=device)
    reference = load_model(cfg.model, LoraConfig(), device=device, for_training=False)
    head = new_value_head(unwrap_hf(policy).config.hidden_size, device)
    return PPOModels(policy, head, reference=reference, value_model=value)


def child(layout: str, args) -> dict:
    importable_alignkit()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from alignkit.data.prompts import load_prompt_data
    from alignkit.models import load_tokenizer
    from alignkit.rollout.generate import stop_token_ids
    from alignkit.train.rl.loop import PromptStream, make_optim
    from alignkit.train.rl.ppo import PPO
    from alignkit.train.rl.ppo_models import build_ppo_models
    from alignkit.train.rl.sampling import Sampler
    from alignkit.train.rl.scoring import make_reward

    set_threads(args.threads)
    out = tempfile.mkdtemp(prefix=f"ppo-bench-{layout}-")
    cfg = _config(args, out)
    acc = Accelerator(cpu=args.device == "cpu")
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = load_prompt_data(cfg, tokenizer)
    reward = make_reward(cfg.ppo, tokenizer, acc.device, batch_size=cfg.train.batch_size)
    rss_before = peak_rss_mb()
    models = (
        build_ppo_models(cfg, acc.device) if layout == "shared" else _separate_lora(cfg, acc.device)
    )
    models.train(False)
    set_seed(cfg.train.seed)
    stops = stop_token_ids(tokenizer, models.policy)
    ppo = PPO(cfg.ppo, cfg.train, models, Sampler(tokenizer, reward, cfg.ppo, stops), acc)
    opt = make_optim(ppo.trainable(), cfg.train, acc, args.steps * ppo.updates_per_step())
    stream = PromptStream(len(data.train), cfg.ppo.rollout_batch_size, cfg.train.seed)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        m = ppo.step([data.train[i] for i in stream.next()], opt)
        m["step_s"] = time.perf_counter() - t0
        steps.append(m)
    result = {
        "layout": models.layout if layout == "shared" else "separate (LoRA)",
        "param_mb": {k: v / 2**20 for k, v in models.component_bytes().items()},
        "rollout_tokens_per_s": sum(s["rollout/tokens_per_s"] for s in steps) / len(steps),
        "train_tokens_per_s": sum(s["tokens_per_s"] for s in steps) / len(steps),
        "step_s": sum(s["step_s"] for s in steps) / len(steps),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_models_mb": rss_before,
        "kl": [s["objective/kl"] for s in steps],
        "loss": [s["loss"] for s in steps],
    }
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _ratio(a, b):
    return a / b if a and b else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(GSM8K))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rollout", type=int, default=8)
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--child", choices=["shared", "separate"])
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    results = {}
    for layout in ("shared", "separate"):
        cmd = [sys.executable, __file__, "--child", layout] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{layout} child failed:\n{proc.stderr[-4000:]}")
        results[layout] = json.loads(line[len("RESULT ") :])
    print(f"machine: {machine()}\nversions: {versions()}")
    for r in results.values():
        mem = f"peak RSS {r['peak_rss_mb']:.0f} MB"
        if "peak_cuda_mb" in r:
            mem += f", peak CUDA {r['peak_cuda_mb']:.0f} MB"
        print(
            f"{r['layout']:>16}: rollout {r['rollout_tokens_per_s']:.1f} tok/s, training "
            f"{r['train_tokens_per_s']:.1f} tok/s, {r['step_s']:.1f} s/step, {mem}"
        )
        print(f"{'':>16}  parameters MB: {json.dumps(r['param_mb'])}")
        print(f"{'':>16}  kl per step {r['kl']}, loss per step {r['loss']}")
    s, d = results["shared"], results["separate"]
    print(
        f"shared / separate: peak RSS x{_ratio(s['peak_rss_mb'], d['peak_rss_mb']):.2f}, "
        f"rollout speed x{_ratio(s['rollout_tokens_per_s'], d['rollout_tokens_per_s']):.2f}, "
        f"training speed x{_ratio(s['train_tokens_per_s'], d['train_tokens_per_s']):.2f}"
    )


if __name__ == "__main__":
    main()
