"""Decoder-LLM data: chat loss masks, plain text, packing, grain state across epochs, truncation, bad inputs."""

import json
import re

import numpy as np
import pytest

from jaxft.config import DataConfig
from jaxft.data import lm
from jaxft.data.builders import DataError
from jaxft.mesh import BatchRows
from tests.fixtures import CHATML, WORDS, save_tokenizer


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("plain"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(*files, **kw):
    return DataConfig(dataset="files", train_files=tuple(str(f) for f in files), **kw)


def _chat(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _records(source):
    return [source[i] for i in range(len(source))]


def _masked_text(encoder, example):
    ids = example["input_ids"][example["loss_mask"] == 1]
    return encoder.tokenizer.decode(ids.tolist())


def test_loss_mask_covers_assistant_turns_with_and_without_a_template(tmp_path, data_dir, chatml_tok, plain_tok):
    two_turns = {
        "messages": [
            {"role": "system", "content": "you are helpful"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "what is the capital of france ?"},
            {"role": "assistant", "content": "paris"},
        ]
    }
    train = _jsonl(tmp_path / "chat.jsonl", [two_turns, {"prompt": "one two", "completion": "three four"}])
    src = lm.open_lm_sources(_cfg(train, max_length=64), need_eval=False)
    by_kind = sorted(_records(src.train), key=lambda r: len(r["roles"]))
    assert [r.decode() for r in by_kind[0]["roles"]] == ["user", "assistant"]  # prompt/completion became a chat
    cases = {chatml_tok: ("hi there <|im_end|>", "paris <|im_end|>"), plain_tok: ("hi there </s>", "paris </s>")}
    for tok, (turn1, turn2) in cases.items():
        enc = lm.LMEncoder(tok, _cfg(train, max_length=64), vocab_size=100)
        assert _masked_text(enc, enc.encode(by_kind[1])).split() == f"{turn1} {turn2}".split()
        completion = enc.encode(by_kind[0])
        assert _masked_text(enc, completion) == turn1.replace("hi there", "three four")
        everything = lm.LMEncoder(tok, _cfg(train, max_length=64, train_on_prompt=True), 100).encode(by_kind[0])
        np.testing.assert_array_equal(everything["input_ids"], completion["input_ids"])
        assert everything["loss_mask"][0] == 0 and everything["loss_mask"][1:].all()  # all but the unpredictable first
        # Generation prompts look exactly like the prompts in training: the example continues them.
        prompt_ids = enc.render_prompt("one two")
        assert completion["input_ids"][: len(prompt_ids)].tolist() == prompt_ids
        assert completion["loss_mask"][: len(prompt_ids)].sum() == 0
    assert enc.tokenizer.decode(prompt_ids).startswith("<s>")  # the built-in template adds BOS once


def test_plain_text_jsonl_and_txt_split_into_chunks(tmp_path, data_dir, minilm):
    txt = tmp_path / "docs.txt"
    txt.write_text("first document\nstill the first\n\n\nsecond one\n\n" + " ".join(["word"] * 40) + "\n")
    jsonl = _jsonl(tmp_path / "t.jsonl", [{"text": "a jsonl document"}])
    src = lm.open_lm_sources(_cfg(txt, jsonl, max_length=16), need_eval=False)
    records = sorted(_records(src.train), key=lambda r: r["source"])
    assert [r["kind"].decode() for r in records] == ["text"] * 4
    assert [r["source"].decode().rsplit(":", 1)[1] for r in records] == ["1", "5", "7", "1"]
    assert records[0]["text"].decode() == "first document\nstill the first"
    enc = lm.LMEncoder(minilm, _cfg(txt, max_length=16), vocab_size=30522)
    one = enc.encode(records[0])
    assert enc.tokenizer.decode(one["input_ids"].tolist()) == "[CLS] first document still the first [SEP]"
    assert one["loss_mask"][1:].all()
    long_rows = enc.encode_rows(records[2])  # 42 tokens: chunks, not an error
    assert [len(r["input_ids"]) for r in long_rows] == [16, 16, 10]


def _sft_rows(n):
    words = WORDS[8:]
    return [
        {"prompt": " ".join(words[: 1 + i % 5]), "completion": " ".join(words[i % 7 : i % 7 + 2])} for i in range(n)
    ]


def _tokens(batches):
    """The multiset of examples (token tuples per segment) in a list of batches."""
    out = []
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            out += [tuple(ids[seg == s].tolist()) for s in np.unique(seg[seg > 0])]
    return sorted(out)


def test_packing_several_examples_per_row_same_tokens_as_unpacked(tmp_path, data_dir, chatml_tok):
    train = _jsonl(tmp_path / "sft.jsonl", _sft_rows(12))
    cfg = _cfg(train, max_length=32)
    src = lm.open_lm_sources(cfg, need_eval=False)
    enc = lm.LMEncoder(chatml_tok, cfg, 100)
    singles = {tuple(enc.encode(src.train[i])["input_ids"].tolist()) for i in range(len(src.train))}
    packed = iter(lm.build_lm_train_dataset(src.train, enc, 4, seed=3, max_length=32, packing=True))
    batch = next(packed)
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "input_ids": ("int32", (4, 32)),
        "loss_mask": ("float32", (4, 32)),
        "segment_ids": ("int32", (4, 32)),
        "positions": ("int32", (4, 32)),
    }
    assert batch["segment_ids"].max(axis=1).min() >= 2  # several examples per row
    for seg, pos, ids, mask in zip(batch["segment_ids"], batch["positions"], batch["input_ids"], batch["loss_mask"]):
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart
            assert tuple(ids[where].tolist()) in singles  # never split
            assert mask[where[0]] == 0
        assert not mask[seg == 0].any() and not ids[seg == 0].any()
    # One epoch of 12 examples = 3 unpacked batches of 4; packed rows carry exactly the same examples.
    unpacked = iter(lm.build_lm_train_dataset(src.train, enc, 4, seed=3, max_length=32, packing=False))
    epoch = [next(unpacked) for _ in range(3)]
    assert (epoch[0]["segment_ids"].max(axis=1) == 1).all()
    np.testing.assert_array_equal(
        epoch[0]["positions"][0][epoch[0]["segment_ids"][0] == 1], np.arange(epoch[0]["segment_ids"][0].sum())
    )
    assert _tokens(epoch) == sorted(singles)
    packed_epoch = iter(lm.build_lm_train_dataset(src.train, enc, 1, seed=3, max_length=32, packing=True))
    seen = []
    while len(seen) < 12:
        seen += _tokens([next(packed_epoch)])
    assert sorted(seen[:12]) == sorted(singles)


@pytest.mark.parametrize("packing", [True, False])
def test_iterator_state_round_trip_across_an_epoch(tmp_path, data_dir, chatml_tok, packing):
    train = _jsonl(tmp_path / "state.jsonl", _sft_rows(10))
    cfg = _cfg(train, max_length=32)
    src = lm.open_lm_sources(cfg, need_eval=False)
    enc = lm.LMEncoder(chatml_tok, cfg, 100)
    build = lambda: lm.build_lm_train_dataset(src.train, enc, 2, seed=5, max_length=32, packing=packing)
    reference = iter(build())
    expected = [next(reference) for _ in range(12)]  # several epochs' worth
    it = iter(build())
    for _ in range(4):
        next(it)
    state = it.get_state()
    fresh = iter(build())
    fresh.set_state(state)
    for want in expected[4:]:  # crosses the epoch boundary (10 examples, 2-4 per batch)
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_truncation_modes(tmp_path, data_dir, chatml_tok):
    rows = [{"prompt": "one two three four five six seven eight", "completion": "paris"}, *_sft_rows(3)]
    train = _jsonl(tmp_path / "long.jsonl", rows)
    src = lm.open_lm_sources(_cfg(train, max_length=12), need_eval=False)
    long = next(r for r in _records(src.train) if r["source"].decode().endswith(":1"))
    with pytest.raises(DataError, match=r"long.jsonl:1: example has 15 tokens, more than data.max_length=12"):
        lm.LMEncoder(chatml_tok, _cfg(train, max_length=12), 100).encode(long)
    left = lm.LMEncoder(chatml_tok, _cfg(train, max_length=12, truncation="left"), 100).encode(long)
    full = lm.LMEncoder(chatml_tok, _cfg(train, max_length=64), 100).encode(long)
    np.testing.assert_array_equal(left["input_ids"], full["input_ids"][-12:])  # the prompt's start goes
    drop = lm.LMEncoder(chatml_tok, _cfg(train, max_length=12, truncation="drop"), 100)
    assert drop.encode(long) is None and drop.dropped == 1
    assert len(list(lm.iter_lm_eval_batches(src.train, drop, 4, 12))) == 1 and drop.dropped == 2
    drop_all = lm.LMEncoder(chatml_tok, _cfg(train, max_length=4, truncation="drop"), 100)
    with pytest.raises(DataError, match="every training example is longer than data.max_length=4"):
        next(iter(lm.build_lm_train_dataset(src.train, drop_all, 2, seed=0, max_length=4, packing=True)))


def test_eval_batches_cover_every_example_once_with_equal_counts(tmp_path, data_dir, chatml_tok):
    train = _jsonl(tmp_path / "tr.jsonl", _sft_rows(4))
    evalf = _jsonl(tmp_path / "ev.jsonl", _sft_rows(7))
    cfg = DataConfig(dataset="files", train_files=(str(train),), eval_files=(str(evalf),), max_length=32)
    src = lm.open_lm_sources(cfg)
    assert len(src.train) == 4 and len(src.eval) == 7
    enc = lm.LMEncoder(chatml_tok, cfg, 100)
    batches = list(lm.iter_lm_eval_batches(src.eval, enc, 4, 32))
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 32)
    rows = np.concatenate([b["input_ids"] for b in batches])
    expected = [enc.encode(src.eval[i])["input_ids"].tolist() for i in range(7)]
    assert [r[: len(e)].tolist() for r, e in zip(rows, expected)] == expected  # in order, once
    last = batches[-1]
    assert not last["input_ids"][3].any() and not last["loss_mask"][3].any() and not last["segment_ids"][3].any()
    per_rank = []
    for mine in ([0, 1], [2, 3]):  # two processes: same number of batches, each its rows of the global ones
        per_rank.append(list(lm.iter_lm_eval_batches(src.eval, enc, BatchRows(4, np.asarray(mine)), 32)))
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for p in per_rank for b in p) == 7
    for b in range(2):
        joined = np.concatenate([per_rank[0][b]["input_ids"], per_rank[1][b]["input_ids"]])
        np.testing.assert_array_equal(joined, batches[b]["input_ids"])


def test_bad_records_name_file_and_line(tmp_path, data_dir):
    cases = {
        "noassistant": (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "noassistant.jsonl:1: chat has no assistant",
        ),
        "role": (
            [_chat("a", "b"), {"messages": [{"role": "bot", "content": "x"}]}],
            "role.jsonl:2: message 0 has role 'bot'",
        ),
        "content": (
            [{"messages": [{"role": "assistant", "content": 3}]}],
            "content.jsonl:1: message 0 .* must be a string",
        ),
        "kind": ([{"text": "ok"}, {"prompt": "only a prompt"}], "kind.jsonl:2: not a known record kind"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(DataError, match=message):
            lm.open_lm_sources(_cfg(_jsonl(tmp_path / f"{name}.jsonl", rows)), need_eval=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: dataset is empty")):
        lm.open_lm_sources(_cfg(empty), need_eval=False)


def test_bad_tokenizer_and_template(tmp_path, chatml_tok):
    with pytest.raises(DataError, match="tokenizer has 48 tokens but the checkpoint's embedding has 10 rows"):
        lm.LMEncoder(chatml_tok, DataConfig(), vocab_size=10)
    # A template that numbers the turns renders a prefix differently from the whole conversation.
    counting = "{{ messages|length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    enc = lm.LMEncoder(chatml_tok, DataConfig(chat_template=counting), 100)
    record = lm.make_lm_record("x.jsonl:3", _chat("hello", "hi"), DataConfig())
    with pytest.raises(DataError, match="x.jsonl:3: the chat template does not render prefixes"):
        enc.encode(record)


@pytest.mark.parametrize("packing", [False, True])
def test_each_process_reads_its_rows_of_the_same_global_batches(tmp_path, data_dir, chatml_tok, packing):
    train = _jsonl(tmp_path / "procs.jsonl", _sft_rows(12))
    cfg = _cfg(train, max_length=32)
    src = lm.open_lm_sources(cfg, need_eval=False)
    enc = lm.LMEncoder(chatml_tok, cfg, 100)
    whole = iter(lm.build_lm_train_dataset(src.train, enc, 4, seed=1, max_length=32, packing=packing))
    expected = [next(whole) for _ in range(3)]
    per_rank = []
    for mine in ([0, 1], [2, 3]):
        rows = BatchRows(4, np.asarray(mine))
        it = iter(lm.build_lm_train_dataset(src.train, enc, rows, seed=1, max_length=32, packing=packing))
        per_rank.append([next(it) for _ in range(3)])
        assert per_rank[-1][0]["input_ids"].shape == (2, 32)
        assert it.get_state() == whole.get_state()  # one global position, whatever the process
    for step in range(3):
        for k in expected[step]:
            joined = np.concatenate([per_rank[0][step][k], per_rank[1][step][k]])
            np.testing.assert_array_equal(joined, expected[step][k])
    if not packing:  # 3 steps of 4 rows: one epoch, every example once
        everything = sorted(tuple(enc.encode(src.train[i])["input_ids"].tolist()) for i in range(12))
        assert sorted(_tokens(expected)) == everything
