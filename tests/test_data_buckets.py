"""Length bucketing: grouped batches (each epoch every example once, similar lengths together, seeded, resumable),
batches padded to their bucket, the same bucket on every process, eval and LM rows bucketed, the config's
checks, and a run that compiles once per bucket with the same eval as static padding."""

import json

import numpy as np
import pytest

from jaxft.config import Config, ConfigError, DataConfig, length_buckets, validate
from jaxft.data import buckets, lm, pipeline
from jaxft.evaluate import eval_run
from jaxft.mesh import BatchRows
from tests.fixtures import CHATML, metrics_records, one_line_error, save_tokenizer, write_config


def test_default_buckets_are_powers_of_two_up_to_max_length_and_bad_lists_are_refused():
    assert length_buckets(DataConfig(max_length=128)) == (16, 32, 64, 128)
    assert length_buckets(DataConfig(max_length=100)) == (16, 32, 64, 100)
    assert length_buckets(DataConfig(max_length=12)) == (12,)
    assert length_buckets(DataConfig(length_buckets=())) == ()
    assert length_buckets(DataConfig(length_buckets=(8, 24), max_length=32)) == (8, 24, 32)  # max_length last
    for bad, message in [((32, 16), "is not increasing"), ((16, 16), "is not increasing"), ((16, 256), "longer than")]:
        with pytest.raises(ConfigError, match=message):
            validate(Config(data=DataConfig(length_buckets=bad, max_length=128)))
    assert buckets.bucket_for(17, (16, 32, 64)) == 32 and buckets.bucket_for(3, (16, 32)) == 16


def test_grouped_batches_see_every_example_once_per_epoch_grouped_by_bucket():
    lengths = np.random.default_rng(0).integers(1, 200, 1000)
    sizes = (16, 32, 64, 128, 200)
    ds = buckets.grouped_batches(lengths, 10, seed=3, buckets=sizes)
    epoch = np.concatenate([ds[k] for k in range(100)])
    assert sorted(epoch.tolist()) == list(range(1000))  # 100 batches of 10: one epoch, every example once
    assert not np.array_equal(np.concatenate([ds[k] for k in range(100, 200)]), epoch)  # reshuffled
    bucket = np.searchsorted(sizes, lengths)
    # a batch is one bucket's rows (but where a bucket ends inside a batch: at most 4 per mega-batch here)...
    assert sum(len(set(bucket[ds[k]])) == 1 for k in range(100)) >= 100 - 2 * 4
    padded = sum(buckets.bucket_for(int(lengths[ds[k]].max()), sizes) for k in range(100))
    random_padded = sum(buckets.bucket_for(int(lengths[i : i + 10].max()), sizes) for i in range(0, 1000, 10))
    assert padded < 0.75 * random_padded
    # ... in random order within the bucket: not sorted by length, as a length sort would leave them
    assert sum(np.all(np.diff(lengths[ds[k]]) <= 0) for k in range(100)) < 10
    assert np.array_equal(buckets.grouped_batches(lengths, 10, seed=3, buckets=sizes)[57], ds[57])
    it = iter(ds)
    for _ in range(5):
        next(it)
    again = iter(buckets.grouped_batches(lengths, 10, seed=3, buckets=sizes))
    again.set_state(it.get_state())
    assert np.array_equal(next(again), next(it))


@pytest.fixture(scope="module")
def texts(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("buckets")
    rows = [{"text": " ".join(["word"] * (1 + (i * 7) % 40)), "label": "ab"[i % 2]} for i in range(48)]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pipeline.open_sources(DataConfig(dataset="files", train_files=(str(path),), eval_files=(str(path),)))


def test_train_batches_are_padded_to_their_bucket_and_equal_on_every_process(texts, minilm):
    enc = pipeline.Encoder(minilm, 48, texts)
    lengths = enc.lengths(texts.train)
    assert lengths.max() == 42 and lengths.min() == 3  # [CLS] + words + [SEP]
    whole = iter(pipeline.build_train_dataset(texts.train, enc, 8, seed=1, buckets=(16, 32, 48)))
    full = [next(whole) for _ in range(12)]
    shapes = {b["input_ids"].shape[1] for b in full}
    assert shapes <= {16, 32, 48} and len(shapes) > 1
    for b in full:
        longest = int(b["attention_mask"].sum(axis=1).max())
        assert b["input_ids"].shape[1] == buckets.bucket_for(longest, (16, 32, 48))
    seen = np.concatenate([b["input_ids"][:, 1] for b in full[:6]])  # 6 batches of 8: one epoch of 48
    assert len(seen) == 48
    again = iter(pipeline.build_train_dataset(texts.train, enc, 8, seed=1, buckets=(16, 32, 48)))
    again.set_state(whole.get_state())  # a resume continues with the very next batch
    nxt, resumed = next(whole), next(again)
    assert all(np.array_equal(resumed[k], nxt[k]) for k in nxt)
    for mine in ([0, 1, 2, 3], [4, 5, 6, 7]):
        it = iter(pipeline.build_train_dataset(texts.train, enc, BatchRows(8, np.asarray(mine)), 1, (16, 32, 48)))
        for b in full[:4]:
            part = next(it)
            assert all(np.array_equal(part[k], b[k][mine]) for k in b)  # same bucket, same rows


def test_eval_batches_are_sorted_bucketed_and_cover_every_example_once(texts, minilm):
    enc = pipeline.Encoder(minilm, 48, texts)
    static = list(pipeline.iter_eval_batches(texts.eval, enc, 10))
    bucketed = list(pipeline.iter_eval_batches(texts.eval, enc, 10, (16, 32, 48)))
    assert len(static) == len(bucketed) == 5 and {b["input_ids"].shape[1] for b in static} == {48}
    widths = [b["input_ids"].shape[1] for b in bucketed]
    assert widths == sorted(widths) and len(set(widths)) == 3  # shortest first
    for b in bucketed:
        assert b["input_ids"].shape[1] == buckets.bucket_for(int(b["attention_mask"].sum(axis=1).max()), (16, 32, 48))

    def rows(batches):
        out = []
        for b in batches:
            for ids, w in zip(b["input_ids"], b["weights"]):
                if w > 0:
                    out.append(tuple(ids[ids > 0].tolist()))
        return sorted(out)

    assert rows(bucketed) == rows(static) and len(rows(static)) == 48


def test_unpacked_lm_rows_are_bucketed(tmp_path, data_dir):
    tok = save_tokenizer(tmp_path / "tok", CHATML)
    path = tmp_path / "chats.jsonl"
    rows = []
    for i in range(40):
        user = {"role": "user", "content": " ".join(["a"] * (1 + i % 30))}
        rows.append({"messages": [user, {"role": "assistant", "content": "b"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset="files", train_files=(str(path),), eval_files=(str(path),), max_length=64, packing=False)
    src = lm.open_lm_sources(cfg)
    enc = lm.LMEncoder(tok, cfg, 100)
    it = iter(lm.build_lm_train_dataset(src.train, enc, 4, 0, 64, packing=False, buckets=(16, 32, 64)))
    batches = [next(it) for _ in range(10)]
    for b in batches:
        longest = int((b["segment_ids"] > 0).sum(axis=1).max())
        assert b["input_ids"].shape[1] == buckets.bucket_for(longest, (16, 32, 64))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    evals = list(lm.iter_lm_eval_batches(src.eval, enc, 8, 64, (16, 32, 64)))
    assert sum(int((b["segment_ids"].max(axis=1) > 0).sum()) for b in evals) == 40
    assert [b["input_ids"].shape[1] for b in evals] == sorted(b["input_ids"].shape[1] for b in evals)


def test_a_bucketed_run_compiles_once_per_bucket_and_evaluates_as_static_padding(tiny_bert, tmp_path, capsys):
    rows = [{"text": " ".join(["good" if i % 2 else "bad"] * (1 + i % 40)), "label": "ab"[i % 2]} for i in range(64)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path / "c.py", tiny_bert, data, train={"max_steps": 16, "eval_every_steps": 8}, data={"max_length": 64}
    )
    from jaxft.config import load_config
    from jaxft.train import train

    result = train(load_config(config), tmp_path / "run")
    assert 1 < result.traces <= 3  # buckets 16, 32, 64: at most one compile each
    records = metrics_records(tmp_path / "run")
    assert all(0.0 < r["padding_fraction"] < 1.0 and r["real_tokens_per_sec"] < r["tokens_per_sec"] for r in records)
    bucketed, _ = eval_run(tmp_path / "run", 16)
    static, _ = eval_run(tmp_path / "run", 16, ["data.length_buckets=[]"])
    assert all(abs(bucketed[k] - static[k]) < 1e-5 for k in ("eval_loss", "eval_accuracy", "eval_macro_f1"))
    assert bucketed["eval_examples"] == static["eval_examples"] == 64


@pytest.mark.parametrize(
    "buckets, message",
    [("[32,16]", "data.length_buckets: [32, 16] is not increasing"), ("[16,99]", "bucket 99 is longer than")],
)
def test_bad_bucket_lists_are_one_line_and_write_nothing(tiny_bert, tmp_path, capsys, buckets, message):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    config = write_config(tmp_path / "c.py", tiny_bert, data, data={"max_length": 64})
    line = one_line_error(["train", config, "--run-dir", tmp_path / "run", f"data.length_buckets={buckets}"], capsys)
    assert message in line and not (tmp_path / "run").exists()
