"""Data: tfds builders for user files, grain shuffling/sharding/state, eval coverage, label errors."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from jaxft.config import DataConfig
from jaxft.data import pipeline
from jaxft.data.builders import DataError
from jaxft.mesh import BatchRows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n, offset=0):
    return [{"review": f"text number {i + offset}", "stars": ["bad", "good", "ok"][i % 3]} for i in range(n)]


def test_files_builder_jsonl_and_csv_with_custom_columns(tmp_path, data_dir, minilm):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(30))
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("review,stars\n" + "".join(f"eval text {i},{['bad', 'good'][i % 2]}\n" for i in range(7)))
    cfg = DataConfig(
        dataset="files",
        train_files=(str(train),),
        eval_files=(str(csv_path),),
        text_column="review",
        label_column="stars",
        max_length=16,
    )
    src = pipeline.open_sources(cfg)
    assert src.label_names == ("bad", "good", "ok")
    assert len(src.train) == 30 and len(src.eval) == 7
    enc = pipeline.Encoder(minilm, 16, src)
    batches = list(pipeline.iter_eval_batches(src.eval, enc, 4))
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (4, 16)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 7  # every eval example exactly once, padding weighted 0
    labels = np.concatenate([b["labels"] for b in batches])[:7]
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1]  # 4 bad, 3 good; tfds stores by key hash


def test_label_not_in_label_set_names_the_line(tmp_path, data_dir):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    cfg = DataConfig(dataset="files", train_files=(str(train),), label_names=("neg", "pos"))
    with pytest.raises(DataError, match=r"t.jsonl:2: label 'meh' is not in the label set \['neg', 'pos'\]"):
        pipeline.open_sources(cfg)


def test_empty_dataset_is_an_error(tmp_path, data_dir):
    train = tmp_path / "empty.jsonl"
    train.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        pipeline.open_sources(DataConfig(dataset="files", train_files=(str(train),)))


def test_missing_column_and_bad_json(tmp_path, data_dir):
    train = _write_jsonl(tmp_path / "c.jsonl", [{"body": "a", "label": "x"}])
    with pytest.raises(DataError, match="c.jsonl:1: missing column 'text'"):
        pipeline.open_sources(DataConfig(dataset="files", train_files=(str(train),)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        pipeline.open_sources(DataConfig(dataset="files", train_files=(str(bad),)))


def test_edited_files_are_prepared_again(tmp_path, data_dir):
    train = _write_jsonl(tmp_path / "e.jsonl", _rows(6))
    cfg = DataConfig(dataset="files", train_files=(str(train),), text_column="review", label_column="stars")
    assert len(pipeline.open_sources(cfg, need_eval=False).train) == 6
    _write_jsonl(train, _rows(9))
    assert len(pipeline.open_sources(cfg, need_eval=False).train) == 9


def test_preparing_prints_nothing(tmp_path, capsys, caplog):
    """tfds prints "Downloading and preparing dataset ..." with print(); a command's stdout (eval's and
    predict's results) carries only jaxft's own output and its errors stay one line, so that is a debug log."""
    train = _write_jsonl(tmp_path / "p.jsonl", _rows(6))
    cfg = DataConfig(dataset="files", train_files=(str(train),), text_column="review", label_column="stars")
    with caplog.at_level(logging.DEBUG, logger="jaxft.data"):
        pipeline.open_sources(dataclasses.replace(cfg, data_dir=str(tmp_path / "tfds")), need_eval=False)
    out, err = capsys.readouterr()
    assert out == "" and "Downloading and preparing" not in err, (out, err)
    assert any(r.getMessage().startswith("tfds: Downloading and preparing dataset") for r in caplog.records)


def test_bundled_reviews_dataset(data_dir):
    src = pipeline.open_sources(DataConfig(dataset="reviews"))
    assert src.label_names == ("negative", "positive")
    assert len(src.train) == 640 and len(src.eval) == 160
    labels = [int(src.eval[i]["label"]) for i in range(len(src.eval))]
    assert sum(labels) == 80  # balanced


def test_grain_iterator_is_seeded_reshuffles_and_resumes_from_state(tmp_path, data_dir, minilm):
    train = _write_jsonl(tmp_path / "g.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(10)])
    src = pipeline.open_sources(DataConfig(dataset="files", train_files=(str(train),)), need_eval=False)
    enc = pipeline.Encoder(minilm, 8, src)
    ds = pipeline.build_train_dataset(src.train, enc, 5, seed=7)
    it = iter(ds)
    first = [next(it)["input_ids"] for _ in range(4)]  # two epochs
    epoch1 = sorted(map(tuple, np.concatenate(first[:2]).tolist()))
    epoch2 = sorted(map(tuple, np.concatenate(first[2:]).tolist()))
    assert epoch1 == epoch2  # each epoch sees every example once
    assert not np.array_equal(np.concatenate(first[:2]), np.concatenate(first[2:]))  # reshuffled
    it2 = iter(pipeline.build_train_dataset(src.train, enc, 5, seed=7))
    np.testing.assert_array_equal(next(it2)["input_ids"], first[0])  # same seed, same order
    state = it.get_state()
    expected = next(it)["input_ids"]
    it3 = iter(pipeline.build_train_dataset(src.train, enc, 5, seed=7))
    it3.set_state(state)
    np.testing.assert_array_equal(next(it3)["input_ids"], expected)


def test_processes_read_their_rows_of_the_same_global_batches(tmp_path, data_dir, minilm):
    train = _write_jsonl(tmp_path / "p.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(10)])
    src = pipeline.open_sources(DataConfig(dataset="files", train_files=(str(train),), eval_files=(str(train),)))
    enc = pipeline.Encoder(minilm, 8, src)
    whole = iter(pipeline.build_train_dataset(src.train, enc, 4, seed=7))
    expected = [next(whole)["input_ids"] for _ in range(3)]
    parts = [BatchRows(4, np.asarray([0, 3])), BatchRows(4, np.asarray([1, 2]))]  # rows need not be contiguous
    for rows in parts:
        it = iter(pipeline.build_train_dataset(src.train, enc, rows, seed=7))
        for step in range(3):
            np.testing.assert_array_equal(next(it)["input_ids"], expected[step][rows.mine])
        assert it.get_state() == whole.get_state()
    evals = [list(pipeline.iter_eval_batches(src.eval, enc, rows)) for rows in parts]
    full = list(pipeline.iter_eval_batches(src.eval, enc, 4))
    assert len(evals[0]) == len(evals[1]) == len(full) == 3
    for b in range(3):
        for part, mine in zip(evals, ([0, 3], [1, 2])):
            weights = full[b]["weights"][mine]
            np.testing.assert_array_equal(part[b]["weights"], weights)
            for k in full[b]:  # a weight-0 padding row's contents do not count
                np.testing.assert_array_equal(part[b][k][weights > 0], full[b][k][mine][weights > 0])
    assert full[2]["weights"].tolist() == [1, 1, 0, 0]


def test_batch_larger_than_dataset_is_an_error(tmp_path, data_dir, minilm):
    train = _write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "label": "a"}] * 3)
    src = pipeline.open_sources(DataConfig(dataset="files", train_files=(str(train),)), need_eval=False)
    with pytest.raises(DataError, match="larger than the 3 training examples"):
        pipeline.build_train_dataset(src.train, pipeline.Encoder(minilm, 8, src), 8, 0)
