"""Preference and KTO data: formats to canonical pairs, raw HH transcripts (real rows),
tokenization with the real SmolLM2 tokenizer, truncation policies, KTO labels, loading."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from alignkit.config import DataConfig
from alignkit.data import (
    KTOExample,
    Pair,
    PairExample,
    PromptMismatch,
    detect_format,
    fit_prompt,
    load_kto_data,
    load_preference_data,
    parse_hh,
    to_pair,
    to_unpaired,
    tokenize_pair,
)
from alignkit.data.io import read_located
from alignkit.errors import DataError

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hh(data_dir):
    """All 1,800 real HH rows with their locations (conversion only: fast)."""
    return read_located(str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"))


def hh_row(hh, line: int) -> Pair:
    """The pair on a 1-based line of the real file."""
    return to_pair(hh.records[line - 1], "hh")


# --- formats -------------------------------------------------------------------------------


def test_plain_text_pair():
    pair = to_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, "preference")
    assert pair == Pair([msg(U, "Hi?")], [msg(A, "Hello.")], [msg(A, "Go away.")])


def test_conversational_pair_with_system_and_multi_turn_prompt():
    prompt = [msg(S, "Be kind."), msg(U, "a"), msg(A, "b"), msg(U, "c")]
    row = {"prompt": prompt, "chosen": [msg(A, "yes")], "rejected": [msg(A, "no")]}
    pair = to_pair(row, "preference")
    assert pair.prompt == prompt and pair.chosen == [msg(A, "yes")]


def test_replies_that_repeat_the_prompt_ultrafeedback_style():
    row = {
        "prompt": "Q",
        "chosen": [msg(U, "Q"), msg(A, "good")],
        "rejected": [msg(U, "Q"), msg(A, "bad")],
    }
    assert to_pair(row, "preference") == Pair([msg(U, "Q")], [msg(A, "good")], [msg(A, "bad")])
    row["rejected"] = [msg(U, "another question"), msg(A, "bad")]
    with pytest.raises(PromptMismatch, match="differ from the prompt"):
        to_pair(row, "preference")


def test_implicit_prompt_is_the_longest_common_prefix():
    shared = [msg(U, "a"), msg(A, "b"), msg(U, "c")]
    row = {"chosen": [*shared, msg(A, "good")], "rejected": [*shared, msg(A, "bad")]}
    assert detect_format([row]) == "preference"
    pair = to_pair(row, "preference")
    assert pair == Pair(shared, [msg(A, "good")], [msg(A, "bad")])
    # Identical conversations: the prompt stops before the reply; chosen == rejected.
    same = to_pair({"chosen": row["chosen"], "rejected": row["chosen"]}, "preference")
    assert same.prompt == shared and same.chosen == same.rejected


def test_implicit_prompt_diverging_early_is_a_mismatch():
    row = {
        "chosen": [msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")],
        "rejected": [msg(U, "a"), msg(A, "other"), msg(U, "c"), msg(A, "d")],
    }
    with pytest.raises(PromptMismatch, match="differ at message 1"):
        to_pair(row, "preference")


def test_column_map_applies_first(tokenizer, tmp_path):
    rows = [{"question": "2+2?", "good": "4", "bad": "5"}] * 2
    cfg = DataConfig(
        train=write_jsonl(tmp_path / "p.jsonl", rows),
        column_map={"question": "prompt", "good": "chosen", "bad": "rejected"},
    )
    data = load_preference_data(cfg, tokenizer, seed=0)
    assert data.format == "preference" and len(data.train) == 2
    assert tokenizer.decode(data.train[0].chosen_ids) == "4<|im_end|>"


def test_missing_rejected_names_file_line_and_fix(tokenizer, tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}] * 2
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_preference_data(DataConfig(train=src), tokenizer, seed=0)
    err = info.value
    assert err.where == f"{src}:2"
    assert "no 'rejected' column" in err.message and "data.column_map" in err.hint


def test_text_pair_without_prompt_is_an_error():
    with pytest.raises(DataError, match="no 'prompt' column"):
        to_pair({"chosen": "a", "rejected": "b"}, "preference")


def test_sft_data_is_refused(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "gsm8k" / "train.jsonl"),
        column_map={"question": "prompt", "answer": "completion"},
        limit=5,
    )
    with pytest.raises(DataError, match="'prompt_completion' is not preference data"):
        load_preference_data(cfg, tokenizer, seed=0)


# --- raw HH transcripts (real rows) --------------------------------------------------------


def test_hh_file_is_detected(hh):
    assert detect_format(hh.records) == "hh"


def test_hh_multi_turn_prompt(hh):
    pair = hh_row(hh, 1)
    assert [m["role"] for m in pair.prompt] == [U, A, U, A, U]
    assert pair.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert pair.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert pair.chosen[0]["content"].startswith("No, sorry!  All of these involve a pen")
    assert pair.rejected[0]["content"].endswith("It’s really funny.")
    assert len(pair.chosen) == len(pair.rejected) == 1
    assert not any("Human:" in m["content"] for m in pair.prompt)


def test_hh_empty_final_reply_is_kept(hh):
    pair = hh_row(hh, 87)
    assert pair.chosen == [msg(A, "")]  # the transcript ends "\n\nAssistant: "
    assert pair.rejected[0]["content"] == "Sure, the address is ..."


def test_hh_transcripts_diverging_before_the_last_assistant_turn(hh):
    # Line 1255's chosen reply contains an inline "  Human: ..." and then "\n\nAssistant:": the
    # raw transcripts diverge at the second-to-last "Assistant:", which is one merged turn.
    pair = hh_row(hh, 1255)
    assert [m["role"] for m in pair.prompt] == [U, A, U]
    assert pair.prompt[-1]["content"] == "Isn't that drag kings?"
    (chosen,) = pair.chosen
    assert chosen["content"].startswith("No. Men who impersonate")
    assert "  Human: Then how do they come" in chosen["content"]
    assert chosen["content"].endswith("?\n\nI think they call them that because")
    assert pair.rejected[0]["content"].startswith("A drag king is the opposite")
    assert len(hh_row(hh, 1689).chosen) == 1


def test_hh_merges_same_speaker_turns_in_the_prompt(hh):
    pair = hh_row(hh, 668)
    roles = [m["role"] for m in pair.prompt]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))
    assert all(m["content"] == m["content"].strip() for m in pair.prompt)


def test_whole_hh_file_converts(hh):
    """What the real file holds: every row a usable pair (see the module docstring of
    alignkit.data.pair_formats for the quirks)."""
    pairs = [to_pair(r, "hh") for r in hh.records]
    counts = Counter()
    for p in pairs:
        counts["multi_turn"] += len(p.prompt) > 1
        counts["empty"] += not p.chosen[0]["content"] or not p.rejected[0]["content"]
        counts["identical"] += p.chosen == p.rejected
        counts["multi_message_reply"] += len(p.chosen) + len(p.rejected) > 2
    assert len(pairs) == 1800
    assert counts == Counter(multi_turn=1276, empty=4)


def test_parse_hh_edge_cases():
    assert parse_hh("Human: hi\n\nAssistant:  hello  ") == [msg(U, "hi"), msg(A, "hello")]
    with pytest.raises(DataError, match="not an HH transcript"):
        parse_hh("hello there")
    with pytest.raises(DataError, match="must be an HH transcript string"):
        to_pair({"chosen": [1], "rejected": "x"}, "hh")


# --- tokenization and truncation -----------------------------------------------------------


def test_tokenized_pair_is_prompt_plus_suffix(tokenizer, hh):
    pair = hh_row(hh, 1)
    ex = tokenize_pair(pair, tokenizer, max_length=4096, truncation="error")
    head = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tokenizer(head, add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for reply, ids in ((pair.chosen, ex.chosen_ids), (pair.rejected, ex.rejected_ids)):
        assert ids[-1] == im_end and im_end not in ids[:-1]
        full = tokenizer.apply_chat_template(pair.prompt + reply, tokenize=False)
        assert tokenizer.decode(ex.prompt_ids + ids) == full.rstrip()
    assert len(ex) == len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))


def test_reply_merging_with_the_generation_prompt_keeps_one_prompt(tokenizer):
    # "assistant\n" + "\n\nHello" tokenizes as "ĊĊ", "Ċ" across the boundary: the prompt's
    # tokens would differ between chosen and rejected, so the reply is tokenized on its own.
    pair = to_pair({"prompt": "q", "chosen": "\n\nHello", "rejected": "no"}, "preference")
    ex = tokenize_pair(pair, tokenizer, max_length=100, truncation="error")
    head = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == tokenizer(head, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ex.prompt_ids + ex.chosen_ids) == head + "\n\nHello<|im_end|>"
    assert tokenizer.decode(ex.rejected_ids) == "no<|im_end|>"


def test_empty_reply_is_just_the_end_of_turn_token(tokenizer, hh):
    ex = tokenize_pair(hh_row(hh, 87), tokenizer, max_length=4096, truncation="error")
    assert tokenizer.convert_ids_to_tokens(ex.chosen_ids) == ["<|im_end|>"]


def test_fit_prompt_policies():
    prompt, chosen, rejected = list(range(10)), [1, 2, 3], [4, 5, 6, 7, 8]
    assert fit_prompt(prompt, [chosen, rejected], 15, "drop").outcome == "kept"
    assert fit_prompt(prompt, [chosen, rejected], 12, "drop") == (None, "too_long")
    cut = fit_prompt(prompt, [chosen, rejected], 12, "truncate")
    assert cut == (list(range(3, 10)), "truncated")  # the prompt's left side goes
    assert fit_prompt(prompt, [chosen, rejected], 6, "truncate").prompt_ids == [9]
    # The longer response alone leaves no room for a prompt token: damaged, never cut.
    assert fit_prompt(prompt, [chosen, rejected], 5, "truncate") == (None, "damaged")
    assert fit_prompt(prompt, [chosen, []], 50, "truncate") == (None, "no_target")
    with pytest.raises(DataError, match="longer than data.max_length=12") as info:
        fit_prompt(prompt, [chosen, rejected], 12, "error", where="f.jsonl:3")
    assert info.value.where == "f.jsonl:3"


def test_truncation_counts_on_real_pairs(tokenizer, data_dir):
    src = str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl")
    full = load_preference_data(DataConfig(train=src, limit=60, max_length=4096), tokenizer, seed=0)
    cap = 160
    over = sum(1 for e in full.train if len(e) > cap)
    damaged = sum(1 for e in full.train if len(e) - len(e.prompt_ids) >= cap)
    assert over > damaged > 0  # the slice has both kinds

    drop = load_preference_data(DataConfig(train=src, limit=60, max_length=cap), tokenizer, seed=0)
    assert drop.stats.dropped_too_long == over and drop.stats.kept == 60 - over
    cut_cfg = DataConfig(train=src, limit=60, max_length=cap, truncation="truncate")
    cut = load_preference_data(cut_cfg, tokenizer, seed=0)
    assert cut.stats.dropped_damaged == damaged and cut.stats.truncated == over - damaged
    assert cut.stats.kept == 60 - damaged and all(len(e) <= cap for e in cut.train)
    kept_full = [e for e in full.train if len(e) - len(e.prompt_ids) < cap]
    for whole, fitted in zip(kept_full, cut.train, strict=True):
        assert whole.prompt_ids[-len(fitted.prompt_ids) :] == fitted.prompt_ids
        assert (whole.chosen_ids, whole.rejected_ids) == (fitted.chosen_ids, fitted.rejected_ids)
    with pytest.raises(DataError) as info:
        error_cfg = DataConfig(train=src, limit=60, max_length=cap, truncation="error")
        load_preference_data(error_cfg, tokenizer, seed=0)
    assert info.value.where.startswith(f"{src}:")


def test_nothing_left_says_why(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), limit=5, max_length=20
    )
    with pytest.raises(DataError, match="no training pairs left of 5 rows") as info:
        load_preference_data(cfg, tokenizer, seed=0)
    assert "data.max_length" in info.value.hint


def test_mismatched_pairs_are_counted_and_dropped(tokenizer, tmp_path):
    good = {"chosen": [msg(U, "a"), msg(A, "b")], "rejected": [msg(U, "a"), msg(A, "c")]}
    bad = {"chosen": [msg(U, "a"), msg(A, "b")], "rejected": [msg(U, "z"), msg(A, "c")]}
    diverged = [msg(U, "a"), msg(A, "x"), msg(U, "y"), msg(A, "c")]
    early = {"chosen": good["chosen"], "rejected": diverged}
    src = write_jsonl(tmp_path / "p.jsonl", [good, bad, early, good])
    data = load_preference_data(DataConfig(train=src), tokenizer, seed=0)
    assert len(data.train) == 2 and data.stats.dropped_prompt_mismatch == 2
    no_prompt = {"chosen": [msg(A, "b")], "rejected": [msg(A, "c")]}
    src = write_jsonl(tmp_path / "p.jsonl", [good, no_prompt])
    with pytest.raises(DataError, match="no user turn before its reply") as info:
        load_preference_data(DataConfig(train=src), tokenizer, seed=0)
    assert info.value.where == f"{src}:2"


def test_held_out_split_is_seeded(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), limit=20, eval_size=4
    )
    a = load_preference_data(cfg, tokenizer, seed=1)
    b = load_preference_data(cfg, tokenizer, seed=1)
    assert len(a.eval) == 4 and a.stats.rows_read + a.eval_stats.rows_read == 20
    assert [e.prompt_ids for e in a.eval] == [e.prompt_ids for e in b.eval]
    assert all(isinstance(e, PairExample) for e in a.train)


# --- KTO -----------------------------------------------------------------------------------


def test_kto_rows(tokenizer, tmp_path):
    rows = [
        {"prompt": "q1", "completion": "good", "label": True},
        {"prompt": [msg(U, "q2")], "completion": [msg(A, "bad")], "label": False},
    ]
    data = load_kto_data(
        DataConfig(train=write_jsonl(tmp_path / "k.jsonl", rows)), tokenizer, seed=0
    )
    assert data.format == "kto" and data.desirable_counts == (1, 1)
    first = data.train[0]
    assert isinstance(first, KTOExample) and first.desirable
    assert tokenizer.decode(first.completion_ids) == "good<|im_end|>"


@pytest.mark.parametrize("label", ["true", 1, 0, "False", None])
def test_kto_label_must_be_boolean(tokenizer, tmp_path, label):
    rows = [{"prompt": "q", "completion": "a", "label": True}] * 2
    rows.append({"prompt": "q", "completion": "a", "label": label})
    src = write_jsonl(tmp_path / "k.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_kto_data(DataConfig(train=src), tokenizer, seed=0)
    assert info.value.where == f"{src}:3"
    if label is not None:
        assert "label must be true or false" in info.value.message
        assert "CSV" in info.value.hint
    with pytest.raises(DataError, match="label must be true or false"):
        to_unpaired({"prompt": "q", "completion": "a", "label": "yes"})


def test_kto_from_pairs(tokenizer, data_dir):
    src = str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl")
    cfg = DataConfig(train=src, limit=10, eval_size=2)
    data = load_kto_data(cfg, tokenizer, seed=0)
    assert data.format == "hh" and len(data.train) == 16 and len(data.eval) == 4
    assert data.desirable_counts == (8, 8)
    # Unpaired in order: the chosen (desirable) then the rejected, with one prompt.
    for good, bad in zip(data.train[::2], data.train[1::2], strict=True):
        assert good.desirable and not bad.desirable
        assert good.prompt_ids == bad.prompt_ids
    # The split is made before unpairing: both halves of a held-out pair are held out.
    assert data.eval[0].prompt_ids == data.eval[1].prompt_ids
    assert data.eval[0].prompt_ids not in [e.prompt_ids for e in data.train]


def test_kto_mismatched_completions_come_from_other_prompts(tokenizer, data_dir):
    """Unpaired from pairs, two examples share each prompt: an example's KL row must not take
    the other one's completion (it would not be mismatched), and examples sharing a prompt get
    one group id."""
    from alignkit.train.kto import prompt_group_ids, with_mismatched

    src = str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl")
    data = load_kto_data(DataConfig(train=src, limit=40), tokenizer, seed=0)
    groups = prompt_group_ids(data.train)
    assert len(set(groups)) == len(data.train) // 2
    for seed in range(5):
        items = with_mismatched(data.train, seed)
        for it, g in zip(items, groups, strict=True):
            owners = [
                j for j, ex in enumerate(data.train) if ex.completion_ids == it.kl_completion_ids
            ]
            assert owners and all(groups[j] != g for j in owners)
    same = [KTOExample([1], [10 + i], True) for i in range(3)]  # one prompt only: the next one
    assert [it.kl_completion_ids for it in with_mismatched(same, 0)] != [[10], [11], [12]]


def test_kto_batches_hold_whole_prompts_unless_turned_off(tokenizer, data_dir):
    """By default a KTO run's batches hold whole prompts (a pair's two halves together, so each
    batch has both labels of its prompts); train.group_by_prompt=false and train.parity give
    the examples' own order."""
    from alignkit.config import load_config
    from alignkit.train.method import build_method
    from alignkit.train.stream import MicroBatchStream

    src = str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl")
    base = ["method=kto", f"data.train={src}", "data.limit=40", "train.batch_size=4"]
    setup = build_method(load_config(None, base), tokenizer)
    assert setup.info["order"] == "by prompt"
    stream = MicroBatchStream(setup.lengths, 4, 1, seed=0, prompt_groups=setup.prompt_groups)
    for i in range(stream.per_epoch):
        batch = [setup.train[j].example.example for j in stream.indices(i, 0)]
        assert sorted(ex.desirable for ex in batch) == [False, False, True, True]
        assert len({tuple(ex.prompt_ids) for ex in batch}) == 2
    for off, order in (
        ("train.group_by_prompt=false", "by length"),
        ("train.parity=true", "by length"),
    ):
        setup = build_method(load_config(None, [*base, off]), tokenizer)
        assert setup.prompt_groups is None and setup.info["order"] == order
    explicit = build_method(
        load_config(None, [*base, "train.parity=true", "train.group_by_prompt=true"]), tokenizer
    )
    assert explicit.prompt_groups is not None
