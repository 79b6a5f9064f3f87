"""KTO for unpaired thumbs-up/down data (Ethayarajh et al. 2024).

KTO's reference point z0 is KL(policy || reference), estimated from mismatched prompt/completion
pairs. Each example's mismatched completion is fixed once, when the data is loaded (example i
takes the completion of example i + 1 in the shuffled dataset), rather than drawn from whatever
micro-batch it lands in: the estimate has the same expectation, and the reference log-probs of
the mismatched rows can then be precomputed and cached like every other reference log-prob.

The mismatched rows only feed z0, which carries no gradient, so the policy sees them in a
separate forward under `torch.no_grad`: the backward pass covers the matched rows alone. Each
kind of row is packed into one row without padding, unless `train.parity` asks for padded rows.
Packed, no prompt is run twice:

- the policy's mismatched rows continue the matched rows' prompts: the training forward keeps
  every layer's keys and values, and the no-grad forward runs only each prompt's last token and
  the mismatched completion after them (`collate_packed_continuations`; a model whose attention
  is not SDPA runs the whole mismatched rows instead, with the same result);
- the reference sees each prompt once, with the completions and mismatched completions of all
  the examples that share it after it (the prefix-shared block of the pair methods, with more
  responses), and its precomputing pass batches the examples sharing a prompt together
  (`by_prompt`): unpaired data made from pairs has two examples per prompt.

A mismatched row then keeps its whole prompt; padded, it is cut from the left to fit
`data.max_length` (as TRL does).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import torch
from torch import nn

from alignkit.config import RunConfig
from alignkit.data.pair_batching import (
    SharedGroup,
    collate_packed_continuations,
    collate_packed_rows,
    collate_packed_shared,
    collate_rows,
    token_count,
)
from alignkit.data.preference import KTOExample
from alignkit.losses import KTOLogps, kto, kto_kl_estimate
from alignkit.ops.packed_attention import KVStore
from alignkit.train.forward import LogpsModel
from alignkit.train.method import (
    Indexed,
    MethodSetup,
    StepOutput,
    WithReference,
    count_examples,
    segment_logps,
    tag_batch,
)


class KTOItem(NamedTuple):
    example: KTOExample
    kl_completion_ids: list[int]  # another example's completion, for the KL estimate


def fit_kl_row(prompt: list[int], completion: list[int], max_length: int):
    """A mismatched row can exceed the limit its parts were fitted to: cut the prompt's left."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    room = max(1, max_length - len(completion))
    return prompt[-room:], completion[: max_length - room]


def with_mismatched(examples: list[KTOExample], seed: int) -> list[KTOItem]:
    """Each example with its mismatched completion: that of the next example, in a seeded
    shuffle, whose prompt is not its own (examples made from one pair share a prompt, and a
    completion of the same prompt would not be mismatched); the very next one if all share it."""
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    group = prompt_group_ids(examples)
    ring = [group[i] for i in order] * 2  # the shuffle twice round, so k + s never wraps
    other = [2 * n] * (2 * n)  # other[p]: the first position after p with another prompt
    for p in range(2 * n - 2, -1, -1):
        other[p] = p + 1 if ring[p + 1] != ring[p] else other[p + 1]
    partner = {i: order[(other[k] if other[k] - k < n else k + 1) % n] for k, i in enumerate(order)}
    return [KTOItem(ex, examples[partner[i]].completion_ids) for i, ex in enumerate(examples)]


def prompt_group_ids(examples: list[KTOExample]) -> list[int]:
    """Per example, an id shared by exactly the examples with the same prompt."""
    ids: dict[tuple[int, ...], int] = {}
    return [ids.setdefault(tuple(ex.prompt_ids), len(ids)) for ex in examples]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """`kto_kl_estimate` over the mismatched rows of every process, not just this one's.

    policy_kl_logps, ref_kl_logps: (M,) this process's rows. Under DDP each process holds a
    slice of the global batch; averaging over all of them makes the reference point, and so the
    loss, the same as one process with the whole batch. Called in training only: every process
    runs the same number of micro-batches there (evaluation shards need not be equal).
    """
    import torch.distributed as dist

    diff = policy_kl_logps.detach().float() - ref_kl_logps.float()  # (M,)
    total = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])  # (2,) sum, count
    dist.all_reduce(total)
    return (total[0] / total[1]).clamp(min=0)


# A KTO batch holds named groups of collated rows, each a dict of row tensors (input_ids,
# attention_mask, position_ids, targets, spans ...):
ROWS = "rows"  # prompt + completion: the training forward
MISMATCHED = "mismatched"  # prompt + mismatched completion: the KL estimate's rows
CONTINUED = "continued"  # packed only: the mismatched completions, continuing the kept prompts
SHARED = "shared"  # packed only: [prompt, completion, mismatched completion] blocks (reference)


def prompt_groups(items: list[KTOItem], mismatched: bool) -> tuple[list[SharedGroup], list[int]]:
    """Each distinct prompt of a batch once, followed by the completion (segment t) of every
    example t with that prompt, and with `mismatched` its mismatched completion (segment B + t);
    and the group of each example."""
    b = len(items)
    group_of = prompt_group_ids([k.example for k in items])  # 0, 1, ... in first-seen order
    groups: list[SharedGroup] = []
    for t, (k, g) in enumerate(zip(items, group_of, strict=True)):
        if g == len(groups):  # the first example with this prompt
            groups.append((k.example.prompt_ids, []))
        groups[g][1].append((k.example.completion_ids, t))
        if mismatched:
            groups[g][1].append((k.kl_completion_ids, b + t))
    return groups, group_of


def by_prompt(items: list[Indexed], batch_size: int) -> list[list[int]]:
    """Batches of about `batch_size` examples in which examples sharing a prompt sit together
    (at most `batch_size` of them in one block), so the reference pass runs each prompt once
    for all of them: unpaired data made from pairs has two examples per prompt."""
    same: dict[int, list[int]] = {}
    for i, g in enumerate(prompt_group_ids([it.example.example for it in items])):
        same.setdefault(g, []).append(i)
    batches, current = [], []
    for idx in same.values():
        for s in range(0, len(idx), batch_size):
            current += idx[s : s + batch_size]
            if len(current) >= batch_size:
                batches.append(current)
                current = []
    return batches + ([current] if current else [])


class KTOMethod(WithReference):
    """KTO loss per example; the normalisation unit is the example."""

    def __init__(self, params: dict, pad_id: int, max_length: int, packed: bool = True):
        self.params, self.pad_id, self.max_length = params, pad_id, max_length
        self.packed = packed

    def collate(self, items: list[Indexed]) -> dict[str, Any]:
        """The named row groups of a batch: ROWS (prompt + completion) and MISMATCHED (prompt +
        mismatched completion), each packed into one row, plus CONTINUED and SHARED; or
        (B, T) padded ROWS and MISMATCHED in parity mode."""
        kto_items: list[KTOItem] = [it.example for it in items]
        matched = [(k.example.prompt_ids, k.example.completion_ids) for k in kto_items]
        if self.packed:  # a prompt shared by several examples of the batch is run once
            groups, group_of = prompt_groups(kto_items, mismatched=False)
            rows = collate_packed_shared(groups, self.pad_id)
            kl_rows = [(k.example.prompt_ids, k.kl_completion_ids) for k in kto_items]
            kl = collate_packed_rows(kl_rows, self.pad_id)
            starts = rows["spans"][:, 0].tolist()  # where each group's prompt begins
            cont = collate_packed_continuations(kl_rows, [starts[g] for g in group_of], self.pad_id)
            ref = collate_packed_shared(prompt_groups(kto_items, mismatched=True)[0], self.pad_id)
            batch = {ROWS: rows, MISMATCHED: kl, CONTINUED: cont, SHARED: ref}
        else:
            kl_rows = [
                fit_kl_row(k.example.prompt_ids, k.kl_completion_ids, self.max_length)
                for k in kto_items
            ]
            batch = {
                ROWS: collate_rows(matched, self.pad_id),
                MISMATCHED: collate_rows(kl_rows, self.pad_id),
            }
        batch["desirable"] = torch.tensor([k.example.desirable for k in kto_items])
        return tag_batch(batch, items)

    units = staticmethod(count_examples)

    def ref_logps(self, module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(2B,) log-probs of the matched rows, then of the mismatched rows, under `module`."""
        b = len(batch["index"])
        if SHARED in batch:  # one forward, each prompt once: segments i and B + i
            return segment_logps(module, batch[SHARED], 2 * b)[0]
        matched, _ = segment_logps(module, batch[ROWS], b)
        mismatched, _ = segment_logps(module, batch[MISMATCHED], b)
        return torch.cat([matched, mismatched])

    def ref_order(self, items: list[Indexed], batch_size: int) -> list[list[int]] | None:
        # packed: examples sharing a prompt together, so the reference runs each prompt once
        return by_prompt(items, batch_size) if self.packed else None

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        b = len(batch["index"])
        kept = KVStore()  # the matched row's keys and values, when its attention is per span
        logps, _ = segment_logps(model, batch[ROWS], b, kv_out=kept)  # (B,)
        # z0 is a constant of the loss (no gradient through it), as in the paper.
        with torch.no_grad():
            if kept and CONTINUED in batch:  # each prompt is not run again
                kl_logps, _ = segment_logps(model, batch[CONTINUED], b, kv_in=kept)
            else:
                kl_logps, _ = segment_logps(model, batch[MISMATCHED], b)  # (B,)
        kept.clear()
        ref = self.require_reference(batch)  # (2B,) matched rows, then mismatched
        if model.training and _world_size() > 1:
            kl = global_kl_estimate(kl_logps, ref[b:])
        else:
            kl = kto_kl_estimate(kl_logps, ref[b:])
        out = kto(KTOLogps(logps, ref[:b], batch["desirable"], kl), **self.params)
        m = out.metrics
        nan = torch.full_like(m["kl"], float("nan"))
        # Per-example values, NaN where the example is of the other kind: the loop averages
        # over the examples that have a value, so each mean is over its own kind only.
        metrics = {
            "rewards/chosen": torch.where(m["count/chosen"] > 0, m["rewards/chosen_sum"], nan),
            "rewards/rejected": torch.where(
                m["count/rejected"] > 0, m["rewards/rejected_sum"], nan
            ),
            "logps/chosen": torch.where(m["count/chosen"] > 0, m["logps/chosen_sum"], nan),
            "logps/rejected": torch.where(m["count/rejected"] > 0, m["logps/rejected_sum"], nan),
            "kl": m["kl"],
        }
        return StepOutput(out.losses.sum(), metrics, token_count(batch[ROWS]))

    @staticmethod
    def finalize_metrics(metrics: dict[str, float]) -> dict[str, float]:
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def kto_lengths(items: list[KTOItem]) -> list[int]:
    return [len(k.example.prompt_ids) + len(k.example.completion_ids) for k in items]


def build_kto_method(cfg: RunConfig, tokenizer) -> MethodSetup:
    from alignkit.data.preference import load_kto_data

    data = load_kto_data(cfg.data, tokenizer, seed=cfg.train.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_items = with_mismatched(data.train, cfg.train.seed)
    eval_items = with_mismatched(data.eval, cfg.train.seed) if data.eval else []
    n_d = sum(ex.desirable for ex in data.train)
    stats = {k: v for k, v in vars(data.stats).items() if not k.startswith("_")}
    # Batches of whole prompts unless told otherwise (parity keeps TRL's independent shuffle):
    # unpaired data made from pairs then has both halves of each pair in one batch.
    grouped = cfg.train.group_by_prompt
    grouped = not cfg.train.parity if grouped is None else grouped
    return MethodSetup(
        method=KTOMethod(
            cfg.method_params(), pad_id, cfg.data.max_length, packed=not cfg.train.parity
        ),
        train=[Indexed("train", i, it) for i, it in enumerate(train_items)],
        eval=[Indexed("eval", i, it) for i, it in enumerate(eval_items)],
        lengths=kto_lengths(train_items),
        wrap=lambda m: LogpsModel(m, chunk_size=cfg.train.logps_chunk_size),
        info={
            "format": data.format,
            **stats,
            "desirable": n_d,
            "undesirable": len(data.train) - n_d,
            "layout": "plain" if cfg.train.parity else "packed",
            "order": "by prompt"
            if grouped
            else ("by length" if cfg.train.group_by_length else "shuffled"),
        },
        prompt_groups=prompt_group_ids(data.train) if grouped else None,
    )
