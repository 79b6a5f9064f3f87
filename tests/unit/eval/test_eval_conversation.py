"""`alignkit eval` keeps a conversational prompt whole: every turn reaches generation and judges."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from alignkit.eval.judge import judge_messages
from alignkit.eval.reward_judge import RewardModelJudge
from alignkit.eval.run import Answers
from alignkit.eval.samples import prompt_of, prompts_from_rows

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Ahoy, Ada!"},
    {"role": "user", "content": "What is my name?"},
]


class Recorder(nn.Module):
    """A model whose generate() keeps the input ids it was given, then generates as usual."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.generation_config = model.generation_config
        self.inputs: list[torch.Tensor] = []

    def generate(self, **kwargs):
        self.inputs.append(kwargs["input_ids"])
        return self.model.generate(**kwargs)


def test_prompt_of_keeps_the_conversation():
    assert prompt_of({"prompt": CONVERSATION}) == CONVERSATION
    assert prompts_from_rows([{"prompt": CONVERSATION}, {"prompt": "Hi"}], "f") == [
        CONVERSATION,
        "Hi",
    ]


def test_generation_input_holds_every_turn(tiny_model, tokenizer):
    recorder = Recorder(tiny_model)
    models = types.SimpleNamespace(
        tokenizer=tokenizer, use=lambda which: contextlib.nullcontext(recorder)
    )
    opts = types.SimpleNamespace(max_new_tokens=3, batch_size=4)
    answers = Answers(models, opts, log=lambda _: None)
    rows = [{"prompt": CONVERSATION}, {"prompt": "Hi"}, {"prompt": CONVERSATION}]
    out = answers.get("model", prompts_from_rows(rows, "eval.jsonl"))
    assert len(out) == 3 and out[0] == out[2]
    assert len(recorder.inputs) == 1 and recorder.inputs[0].shape[0] == 2  # generated once each
    text = tokenizer.decode(recorder.inputs[0][0], skip_special_tokens=False)
    for turn in CONVERSATION:
        assert f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llm_judge_sees_every_turn():
    user = judge_messages(CONVERSATION, "Ada.", "Bob.")[-1]["content"]
    for turn in CONVERSATION:
        assert turn["content"] in user
    assert (
        user.index("You are a pirate.") < user.index("What is my name?") < user.index("[Answer A]")
    )


def test_reward_judge_scores_the_whole_conversation():
    seen = []

    class Scorer:
        def score(self, prompts, responses, *, batch_size=8):
            seen.extend(prompts)
            return torch.tensor([float(len(r)) for r in responses])

    judge = RewardModelJudge(Scorer())
    assert judge.compare(CONVERSATION, "Ada, matey.", "Ada.") == "first"
    assert judge.compare(CONVERSATION, "Ada, matey.", "Ada.") == "first"  # cached
    assert seen == [CONVERSATION, CONVERSATION]
