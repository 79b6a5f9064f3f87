"""One batch of 8 and 8 accumulated micro-batches of 1 give the same gradients.

The loss is normalised by the labelled tokens of the whole accumulated batch, so every token
weighs the same wherever it lands; a per-micro-batch mean would fail this test (sequences here
have different numbers of labelled tokens).
"""

import torch

from tests.conftest import make_tiny_model
from tests.trainer_utils import make_trainer, synthetic_examples


def grads_after_accumulation(tmp_path, batch_size, grad_accum):
    model = make_tiny_model(seed=3)
    examples = synthetic_examples(8)
    trainer = make_trainer(
        model,
        examples,
        tmp_path / f"b{batch_size}",
        [
            f"train.batch_size={batch_size}",
            f"train.grad_accum={grad_accum}",
            "train.group_by_length=false",
        ],
    )
    trainer.accumulate(0, grad_accum)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_big_batch_equals_accumulated_micro_batches(tmp_path):
    # Unequal label counts: a per-micro-batch mean would weigh tokens differently and fail.
    assert len({sum(t != -100 for t in e.labels) for e in synthetic_examples(8)}) > 1
    big = grads_after_accumulation(tmp_path, 8, 1)
    small = grads_after_accumulation(tmp_path, 1, 8)
    assert big.keys() == small.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=1e-4, msg=name)
