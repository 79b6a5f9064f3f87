"""Capability checks: GSM8K answer extraction and exact match, multiple-choice log-likelihood."""

import pytest
import torch

from alignkit.data.io import LocatedRecords
from alignkit.errors import DataError
from alignkit.eval.capability import (
    ChoiceItem,
    ChoiceScores,
    choice_accuracy,
    choice_items,
    choice_logps,
    exact_match,
    extract_answer,
    gsm8k_items,
    normalise_number,
    tokenize_choices,
)
from alignkit.train.forward import LogpsModel
from tests.conftest import make_tiny_model


def located(rows):
    return LocatedRecords(rows, [f"f.jsonl:{i + 1}" for i in range(len(rows))])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("72", "72"),
        ("$1,234", "1234"),
        ("1,234.00", "1234"),
        ("18.0", "18"),
        ("-3.50", "-3.5"),
        ("0.25", "0.25"),
        ("100", "100"),  # trailing zeros of an integer are digits, not decimals
        ("-0.0", "0"),
        (" 42 dollars.", "42"),
        ("no number", None),
    ],
)
def test_normalise_number(text, number):
    assert normalise_number(text) == number


def test_extract_answer_takes_the_last_mark_and_its_first_line():
    assert extract_answer("48/2 = 24\n#### 72") == "72"
    assert extract_answer("#### 5\nso #### $1,000.0\nmore text 9") == "1000"
    assert extract_answer("the answer is 72") is None
    assert extract_answer("####") is None


def test_exact_match_counts_by_hand():
    refs = ["... #### 72", "... #### 1,000", "... #### 5", "... #### 3"]
    gens = ["so #### 72.0", "#### $1000", "the answer is 5", "#### 4"]
    em = exact_match(gens, refs)
    # right: 1 (72.0 == 72) and 2 (commas and $); 3 has no '####'; 4 is wrong
    assert (em.correct, em.no_answer, em.n) == (2, 1, 4)
    assert em.accuracy == pytest.approx(0.5)


def test_gsm8k_rows_need_a_marked_answer():
    items = gsm8k_items(located([{"question": "1+1?", "answer": "1+1=2\n#### 2"}]))
    assert items[0].question == "1+1?"
    with pytest.raises(DataError, match="no number after '####'") as exc:
        gsm8k_items(
            located([{"question": "q", "answer": "#### 2"}, {"question": "q", "answer": "2"}])
        )
    assert exc.value.where == "f.jsonl:2"


def test_choice_answers_by_index_or_text():
    rows = [
        {"question": "q1", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "q2", "choices": ["x", "y"], "answer": "y"},
    ]
    assert [it.answer for it in choice_items(located(rows))] == [2, 1]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (3, "out of range for 3 choices"),
        (-1, "out of range"),
        ("d", "not one of the choices"),
        (True, "not one of the choices"),
    ],
)
def test_bad_choice_answers_are_refused(answer, message):
    rows = [{"question": "q", "choices": ["a", "b", "c"], "answer": answer}]
    with pytest.raises(DataError, match=message) as exc:
        choice_items(located(rows))
    assert exc.value.where == "f.jsonl:1"


def test_choices_must_be_a_list_of_strings():
    with pytest.raises(DataError, match="at least two non-empty strings"):
        choice_items(located([{"question": "q", "choices": "a,b", "answer": 0}]))


def hand_choice_logps(model, prompt_ids, choice_ids):
    """Full-logits forward of prompt + choice, summed over the choice tokens."""
    ids = torch.tensor([prompt_ids + choice_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V)
    start = len(prompt_ids) - 1  # the position that predicts the first choice token
    return logp[start:].gather(1, ids[0, 1:][start:, None]).sum().item()


def test_choice_scores_equal_a_full_logits_forward(tokenizer):
    torch.manual_seed(0)
    model = make_tiny_model(seed=3)
    items = [
        ChoiceItem("What colour is the sky?", ["Blue.", "Green, mostly, on some days.", "Red"], 0),
        ChoiceItem("2 + 2 =", ["4", "five"], 1),
        ChoiceItem("Pick one", ["alpha", "beta", "gamma", "a much longer delta"], 3),
    ]
    examples = tokenize_choices(items, tokenizer)
    # the end-of-turn token closes every choice: it is scored as part of the reply
    assert all(
        ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        for ex in examples
        for ids in ex.choice_ids
    )
    scores = choice_logps(LogpsModel(model), examples, pad_id=2, batch_size=2)
    for ex, lp, tok in zip(examples, scores.logps, scores.tokens, strict=True):
        hand = [hand_choice_logps(model, ex.prompt_ids, c) for c in ex.choice_ids]
        assert lp.tolist() == pytest.approx(hand, abs=1e-4)
        assert tok.tolist() == [len(c) for c in ex.choice_ids]


def test_choice_accuracy_sum_and_per_token_by_hand():
    scores = ChoiceScores(
        logps=[torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -4.0, -9.0])],
        tokens=[torch.tensor([1.0, 4.0]), torch.tensor([1.0, 4.0, 9.0])],
    )
    # question 1: sum picks 0, per token (-2, -1.5) picks 1; question 2: sum picks 0,
    # per token (-3, -1, -1) picks 1 (the first of the tie)
    acc = choice_accuracy(scores, [1, 1])
    assert acc.accuracy == 0.0 and acc.accuracy_norm == 1.0 and acc.n == 2
    assert choice_accuracy(scores, [0, 0]).accuracy == 1.0
