"""Format detection and conversion to canonical messages."""

from __future__ import annotations

import pytest

from alignkit.data.formats import apply_column_map, detect_format, to_messages
from alignkit.data.io import read_records
from alignkit.errors import DataError

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


CONV = [msg(U, "hi"), msg(A, "yo")]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"messages": CONV}, "messages"),
        ({"conversations": CONV}, "messages"),  # the turn fields decide, not the column name
        ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"text": "t"}, "text"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": CONV, "rejected": CONV}, "preference"),  # implicit prompt
        ({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x"}, "hh"),
        ({"prompt": "p", "completion": "c", "label": True}, "kto"),
        ({"prompt": "p"}, "prompt_only"),
    ],
)
def test_detect_each_format(row, fmt):
    assert detect_format([row]) == fmt


def test_detect_real_files(data_dir):
    gsm8k = read_records(str(data_dir / "gsm8k" / "train.jsonl"), limit=20)
    assert detect_format(gsm8k, {"question": "prompt", "answer": "completion"}) == (
        "prompt_completion"
    )
    roleplay = read_records(str(data_dir / "gpteacher-roleplay" / "roleplay.json"), limit=20)
    assert detect_format(roleplay) == "alpaca"
    hh = read_records(str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), limit=20)
    assert detect_format(hh) == "hh"


def test_unknown_columns_say_what_was_found_and_what_is_expected(data_dir):
    gsm8k = read_records(str(data_dir / "gsm8k" / "train.jsonl"), limit=5)
    with pytest.raises(DataError) as info:
        detect_format(gsm8k)
    err = info.value
    assert "found columns: answer, question" in err.message
    assert "prompt_completion needs prompt/completion" in err.hint
    assert "alpaca needs instruction/output" in err.hint
    assert "data.column_map" in err.hint


def test_detection_follows_the_majority_of_rows():
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"text": "t"}]
    assert detect_format(rows) == "prompt_completion"


def test_apply_column_map_renames_and_keeps_the_rest():
    row = {"question": "q", "answer": "a", "id": 3}
    assert apply_column_map(row, {"question": "prompt", "answer": "completion"}) == {
        "prompt": "q",
        "completion": "a",
        "id": 3,
    }
    assert apply_column_map(row, {}) is row


def test_prompt_completion_strings_and_message_lists():
    assert to_messages({"prompt": "q", "completion": "a"}, "prompt_completion") == [
        msg(U, "q"),
        msg(A, "a"),
    ]
    row = {
        "prompt": [msg("system", "be brief"), msg(U, "q")],
        "completion": [msg(A, "a")],
    }
    assert to_messages(row, "prompt_completion") == [
        msg("system", "be brief"),
        msg(U, "q"),
        msg(A, "a"),
    ]


def test_alpaca_joins_instruction_and_input():
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
    assert to_messages(row, "alpaca") == [msg(U, "Translate\n\nbonjour"), msg(A, "hello")]
    row = {"instruction": "Say hi", "input": "  ", "output": "hi", "system": "be kind"}
    assert to_messages(row, "alpaca") == [msg("system", "be kind"), msg(U, "Say hi"), msg(A, "hi")]


def test_alpaca_on_real_roleplay(data_dir):
    rows = read_records(str(data_dir / "gpteacher-roleplay" / "roleplay.json"), limit=50)
    with_input = next(r for r in rows if r["input"])
    conv = to_messages(with_input, "alpaca")
    assert conv[0]["content"] == with_input["instruction"] + "\n\n" + with_input["input"]
    assert conv[-1] == msg(A, with_input["output"])


def test_sharegpt_speakers():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ]
    }
    assert to_messages(row, "sharegpt") == [
        msg("system", "s"),
        msg(U, "q"),
        msg(A, "a"),
        msg(U, "q2"),
        msg(A, "a2"),
    ]
    bad = {"conversations": [{"from": "narrator", "value": "x"}]}
    with pytest.raises(DataError, match="turn 0 is from 'narrator'"):
        to_messages(bad, "sharegpt")


def test_messages_keep_role_and_content_and_join_text_parts():
    row = {
        "messages": [
            {"role": U, "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": A, "content": "c", "name": "bot"},
        ]
    }
    assert to_messages(row, "messages") == [msg(U, "ab"), msg(A, "c")]


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ([msg("bot", "x"), msg(A, "y")], "role 'bot'"),
        ([msg(U, "x"), msg("system", "s"), msg(A, "y")], "only the first"),
        ([msg(U, "x")], "no assistant turn"),
        ([msg("system", "s"), msg(A, "y"), msg(U, "x")], "starts with an assistant turn"),
        ([], "empty"),
        ([{"role": U}], "'role' and 'content'"),
    ],
)
def test_invalid_conversations(turns, match):
    with pytest.raises(DataError, match=match):
        to_messages({"messages": turns}, "messages")


def test_text_rows_and_missing_columns():
    assert to_messages({"text": "hello"}, "text") == {"text": "hello"}
    with pytest.raises(DataError, match="no 'completion' column"):
        to_messages({"prompt": "p"}, "prompt_completion")
    with pytest.raises(DataError, match="must be a string"):
        to_messages({"prompt": 3, "completion": "c"}, "prompt_completion")


def test_preference_formats_are_named_but_not_converted():
    with pytest.raises(DataError, match="cannot be converted") as info:
        to_messages({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference")
    assert "prompt_completion" in info.value.hint
    with pytest.raises(DataError, match="unknown data format 'chat'"):
        to_messages({}, "chat")
