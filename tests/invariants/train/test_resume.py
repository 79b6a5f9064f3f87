"""A run interrupted and resumed from its checkpoint ends with the same weights as a
continuous one: trainable weights, optimizer, schedule, RNG (LoRA dropout) and data position."""

import pytest
import torch

from alignkit.config import LoraConfig
from alignkit.models.lora import apply_lora
from tests.conftest import make_tiny_model
from tests.trainer_utils import make_trainer, synthetic_examples

ARGS = [
    "train.max_steps=4",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.lr=1e-2",
    "train.resume=auto",
    "train.warmup_steps=1",
]


def lora_model():
    model = make_tiny_model(seed=5)
    torch.manual_seed(11)
    return apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.2))


def final_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resumed_equals_continuous(tmp_path):
    examples = synthetic_examples(10, seed=1)
    full = lora_model()
    make_trainer(full, examples, tmp_path / "continuous", ARGS).fit()

    first = lora_model()
    trainer = make_trainer(first, examples, tmp_path / "resumed", ARGS)
    trainer.train_step()
    trainer.train_step()
    trainer.save()
    del first, trainer

    second = lora_model()  # a fresh process would rebuild the model like this
    resumed = make_trainer(second, examples, tmp_path / "resumed", ARGS)
    fit = resumed.fit()
    assert fit.state.step == 4
    a, b = final_weights(full), final_weights(second)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    # And training moved the weights at all (else equality would be trivial).
    untouched = final_weights(lora_model())
    assert any(not torch.allclose(a[n], untouched[n]) for n in a)


def test_interrupt_saves_checkpoint(tmp_path, monkeypatch):
    from alignkit.train.loop import Interrupted

    trainer = make_trainer(lora_model(), synthetic_examples(10), tmp_path / "run", ARGS)
    real_step = trainer.train_step
    calls = {"n": 0}

    def step_then_interrupt():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    with pytest.raises(Interrupted, match="resume=auto"):
        trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").is_file()


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    """fp16 runs scale the loss with a GradScaler whose scale moves during training (halved on
    overflow, grown after a streak of good steps): a resumed run must continue from it, not
    from the initial scale. (CUDA is where fp16 runs; the CPU scaler has the same state.)"""
    from alignkit.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)
    for overflow in (False, True, False, False):
        opt.zero_grad()
        scaler.scale(model(torch.ones(2, 3)).sum()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**9 and scaler.state_dict()["_growth_tracker"] == 2
    ckpt = tmp_path / "step-4"
    state = TrainerState(step=4)
    save_checkpoint(ckpt, model, opt, sched, state, rank=0, is_main=True, scaler=scaler)

    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)
    load_checkpoint(ckpt, model, opt, sched, rank=0, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict()
    # A checkpoint written without a scaler (bf16 or fp32 runs) leaves one alone.
    plain = tmp_path / "plain"
    save_checkpoint(plain, model, opt, sched, state, rank=0, is_main=True)
    untouched = torch.amp.GradScaler("cpu", init_scale=8.0)
    load_checkpoint(plain, model, opt, sched, rank=0, scaler=untouched)
    assert untouched.get_scale() == 8.0
