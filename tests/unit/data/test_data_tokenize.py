"""Label masks, truncation policies and SFT dataset building on the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from alignkit.config import DataConfig
from alignkit.data.templates import NAMED_TEMPLATES, render_conversation
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    fit_to_length,
    load_sft_data,
    tokenize_sft,
)
from alignkit.errors import DataError

U, A, S = "user", "assistant", "system"
GSM8K_MAP = {"question": "prompt", "answer": "completion"}


def msg(role, content):
    return {"role": role, "content": content}


def trained_runs(example, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for tok, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == tok  # labels are the inputs themselves; the model shifts
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def tok(conv, tokenizer, **kw):
    kw.setdefault("max_length", 4096)
    kw.setdefault("truncation", "error")
    return tokenize_sft(conv, tokenizer, **kw)


MULTI = [msg(U, "hi"), msg(A, "yo"), msg(U, "2+2?"), msg(A, " 4, sure 😀")]


def test_mask_covers_exactly_replies_and_im_end_multi_turn(tokenizer):
    ex = tok(MULTI, tokenizer)
    assert trained_runs(ex, tokenizer) == ["yo<|im_end|>", " 4, sure 😀<|im_end|>"]
    text = tokenizer.decode(ex.input_ids)
    assert text == tokenizer.apply_chat_template(MULTI, tokenize=False)  # nothing added twice
    assert ex.input_ids.count(tokenizer.bos_token_id) == 5  # default system + 4 turns


def test_spans_end_at_the_end_of_turn_token_not_the_newline(tokenizer):
    rendered = render_conversation(MULTI, tokenizer)
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        "yo<|im_end|>",
        " 4, sure 😀<|im_end|>",
    ]
    assert all(rendered.text[b] == "\n" for _, b in rendered.spans)


@pytest.mark.parametrize(
    ("template", "runs"),
    [
        ("chatml", ["yo<|im_end|>", " 4, sure 😀<|im_end|>"]),
        ("alpaca", ["yo<|im_end|>", " 4, sure 😀<|im_end|>"]),  # EOS appended by the template
        ("llama3", ["yo<|eot_id|>", "4, sure 😀<|eot_id|>"]),  # llama3 trims content
    ],
)
def test_named_templates(tokenizer, template, runs):
    rendered = render_conversation(MULTI, tokenizer, chat_template=template)
    assert [rendered.text[a:b] for a, b in rendered.spans] == runs
    assert set(NAMED_TEMPLATES) >= {"chatml", "llama3", "alpaca"}


def test_jinja_string_template_and_unknown_name(tokenizer):
    jinja = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    )
    jinja += "{% if add_generation_prompt %}assistant: {% endif %}"
    rendered = render_conversation(MULTI[:2], tokenizer, chat_template=jinja)
    assert rendered.text == "user: hi<|im_end|>\nassistant: yo<|im_end|>\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["yo<|im_end|>"]
    with pytest.raises(DataError, match="unknown chat template 'zephyr'"):
        render_conversation(MULTI, tokenizer, chat_template="zephyr")


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    # Marks the last message specially, so an earlier reply renders differently later on.
    jinja = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(DataError, match="not prefix-stable") as info:
        render_conversation(MULTI, tokenizer, chat_template=jinja)
    assert "model.chat_template" in info.value.hint


def test_no_chat_template_falls_back_to_chatml(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    rendered = render_conversation(MULTI[:2], tokenizer)
    assert rendered.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_plain_text_trains_on_everything_plus_eos(tokenizer):
    ex = tok({"text": "The cat sat."}, tokenizer)
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids) == "The cat sat.<|im_end|>"


def test_completion_only_false_trains_on_every_token(tokenizer):
    ex = tok(MULTI, tokenizer, completion_only=False)
    assert ex.labels == ex.input_ids


def test_truncation_policies(tokenizer):
    long_prompt = [msg(U, "word " * 200), msg(A, "short answer")]
    full = tok(long_prompt, tokenizer)
    assert len(full) > 64
    assert tok(long_prompt, tokenizer, max_length=64, truncation="drop") is None
    with pytest.raises(DataError, match="longer than data.max_length=64") as info:
        tok(long_prompt, tokenizer, max_length=64, truncation="error", where="f.jsonl:3")
    assert info.value.where == "f.jsonl:3"
    cut = tok(long_prompt, tokenizer, max_length=64, truncation="truncate")
    # The prompt's left side goes; the end (assistant header, reply, end of turn) stays intact.
    assert len(cut) == 64 and cut.input_ids == full.input_ids[-64:]
    assert trained_runs(cut, tokenizer) == ["short answer<|im_end|>"]


def test_truncation_cuts_a_too_long_response_at_its_right_end(tokenizer):
    conv = [msg(U, "q"), msg(A, "and " * 100)]
    full = tok(conv, tokenizer)
    cut = tok(conv, tokenizer, max_length=32, truncation="truncate")
    start = next(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    assert cut.input_ids == full.input_ids[start : start + 32]
    assert all(x != IGNORE_INDEX for x in cut.labels)
    assert tokenizer.eos_token_id not in cut.input_ids


def test_truncate_keeps_the_last_turns(tokenizer):
    conv = [msg(U, "first " * 50), msg(A, "one"), msg(U, "second"), msg(A, "two")]
    full = tok(conv, tokenizer)
    cut = tok(conv, tokenizer, max_length=len(full) - 20, truncation="truncate")
    assert trained_runs(cut, tokenizer) == ["one<|im_end|>", "two<|im_end|>"]
    assert cut.input_ids == full.input_ids[20:]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_load_counts_truncation_outcomes(tokenizer, tmp_path):
    rows = [{"prompt": "q", "completion": "a"}] * 3 + [{"prompt": "long " * 100, "completion": "b"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_sft_data(DataConfig(train=src, max_length=48), tokenizer, seed=0)
    s = data.stats
    assert (s.rows_read, s.kept, s.dropped_too_long, s.truncated) == (4, 3, 1, 0)
    data = load_sft_data(
        DataConfig(train=src, max_length=48, truncation="truncate"), tokenizer, seed=0
    )
    assert (data.stats.kept, data.stats.truncated, data.stats.dropped_too_long) == (4, 1, 0)
    assert all(len(e) <= 48 for e in data.train)
    with pytest.raises(DataError) as info:
        load_sft_data(DataConfig(train=src, max_length=48, truncation="error"), tokenizer, seed=0)
    assert info.value.where == f"{src}:4"


def test_rows_without_label_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    # A (broken) template that never renders replies leaves nothing to learn from.
    jinja = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}"
    jinja += "{% endfor %}"
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 2)
    with pytest.raises(DataError, match="2 of 2 rows have no token to learn from"):
        load_sft_data(DataConfig(train=src), tokenizer, seed=0, chat_template=jinja)
    enc = Encoded([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], [(0, 1)] * 4, response_start=2)
    assert fit_to_length(enc, 2, "truncate").outcome == "truncated"
    enc.labels[2:] = [IGNORE_INDEX, IGNORE_INDEX]
    assert fit_to_length(enc, 8, "drop").outcome == "no_target"


def test_gsm8k_via_column_map(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "gsm8k" / "train.jsonl"),
        column_map=GSM8K_MAP,
        limit=20,
        max_length=512,
    )
    data = load_sft_data(cfg, tokenizer, seed=0)
    assert data.format == "prompt_completion" and data.stats.rows_read == 20
    rows = [json.loads(x) for x in open(cfg.train, encoding="utf-8").readlines()[:20]]
    assert len(data.train) == 20
    for ex, row in zip(data.train, rows, strict=True):
        assert trained_runs(ex, tokenizer) == [row["answer"] + "<|im_end|>"]


def test_gsm8k_without_column_map_says_what_to_do(tokenizer, data_dir):
    cfg = DataConfig(train=str(data_dir / "gsm8k" / "train.jsonl"), limit=5)
    with pytest.raises(DataError) as info:
        load_sft_data(cfg, tokenizer, seed=0)
    assert "question" in info.value.message and "data.column_map" in info.value.hint


def test_alpaca_roleplay(tokenizer, data_dir):
    src = str(data_dir / "gpteacher-roleplay" / "roleplay.json")
    data = load_sft_data(DataConfig(train=src, limit=30, max_length=2048), tokenizer, seed=0)
    rows = json.load(open(src, encoding="utf-8"))[:30]
    assert data.format == "alpaca" and len(data.train) == 30
    for ex, row in zip(data.train, rows, strict=True):
        assert trained_runs(ex, tokenizer) == [row["output"] + "<|im_end|>"]
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert user in tokenizer.decode(ex.input_ids)


def test_sharegpt_file(tokenizer, tmp_path):
    conv = [
        {"from": "human", "value": "hello"},
        {"from": "gpt", "value": "hi there"},
        {"from": "human", "value": "bye"},
        {"from": "gpt", "value": "see you"},
    ]
    src = write_jsonl(tmp_path / "s.jsonl", [{"conversations": conv}])
    data = load_sft_data(DataConfig(train=src), tokenizer, seed=0)
    assert data.format == "sharegpt"
    assert trained_runs(data.train[0], tokenizer) == ["hi there<|im_end|>", "see you<|im_end|>"]


def test_text_file(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    data = load_sft_data(DataConfig(train=src), tokenizer, seed=0)
    assert data.format == "text"
    assert trained_runs(data.train[0], tokenizer) == ["Once upon a time.<|im_end|>"]


def test_heldout_split_is_seeded_and_deterministic(tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)

    def split(seed, **kw):
        data = load_sft_data(DataConfig(train=src, **kw), tokenizer, seed=seed)
        return [tokenizer.decode(e.input_ids) for e in data.eval], len(data.train)

    first, n_train = split(1, eval_fraction=0.2)
    assert len(first) == 4 and n_train == 16
    assert split(1, eval_fraction=0.2)[0] == first
    assert split(2, eval_fraction=0.2)[0] != first
    assert len(split(1, eval_size=3)[0]) == 3
    with pytest.raises(DataError, match="cannot hold out 20 of 20"):
        split(1, eval_size=20)


def test_eval_file(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}] * 5)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "held out"}] * 2)
    data = load_sft_data(DataConfig(train=train, eval=evals), tokenizer, seed=0)
    assert len(data.train) == 5 and len(data.eval) == 2 and data.eval_stats.kept == 2


def test_nothing_left_names_the_shortest_prompt_and_a_max_length(tokenizer, data_dir):
    cfg = DataConfig(
        train=str(data_dir / "gsm8k" / "train.jsonl"), column_map=GSM8K_MAP, limit=10, max_length=16
    )
    with pytest.raises(DataError) as info:
        load_sft_data(cfg, tokenizer, seed=0)
    err = info.value
    assert "max_length=16 is shorter than every prompt (the shortest prompt is" in err.message
    assert "set data.max_length to about" in err.hint


def test_bad_row_is_named_by_file_and_line(tokenizer, tmp_path):
    rows = [{"messages": [msg(U, "x"), msg(A, "y")]}, {"messages": [msg("robot", "x")]}]
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match="role 'robot'") as info:
        load_sft_data(DataConfig(train=src), tokenizer, seed=0)
    assert info.value.where == f"{src}:2"


def test_preference_data_is_refused_for_sft(tokenizer, data_dir):
    cfg = DataConfig(train=str(data_dir / "hh-rlhf-harmless" / "pairs.jsonl"), limit=5)
    with pytest.raises(DataError, match="format 'hh' is not supervised fine-tuning data"):
        load_sft_data(cfg, tokenizer, seed=0)
