"""Sources → grain pipelines → per-process numpy batches: seeded shuffle, repeat, global batches of which
each process takes its rows, and tokenization with the checkpoint's own tokenizer. Iterator state is checkpointable.

Turning host batches into global jax.Arrays is mesh.make_global_batch's job.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxft.config import DataConfig
from jaxft.data import IGNORE_LABEL, builders, selected_rows
from jaxft.data import buckets as bucket_lib
from jaxft.data.builders import DataError


@dataclasses.dataclass
class Sources:
    train: Any  # random-access data source (len, __getitem__)
    eval: Any | None
    label_names: tuple[str, ...]
    text_key: str
    pair_key: str
    label_key: str
    token_level: bool = False


def default_data_dir() -> str:
    return os.environ.get("JAXFT_DATA_DIR", str(Path("~/.cache/jaxft/tfds").expanduser()))


def open_sources(cfg: DataConfig, need_eval: bool = True, task: str = "sequence-classification") -> Sources:
    """Prepares (once) and opens the train and eval splits as tfds array_record data sources."""
    token_level = task == "token-classification"
    data_dir = cfg.data_dir or default_data_dir()
    if cfg.dataset in ("reviews", "files"):
        if cfg.dataset == "reviews":
            if token_level:
                raise DataError("data.dataset: 'reviews' is a sequence-classification dataset")
            builder = builders.build_reviews_dataset(data_dir)
        else:
            splits = {cfg.train_split: [Path(f) for f in cfg.train_files]}
            if cfg.eval_files:
                splits[cfg.eval_split] = [Path(f) for f in cfg.eval_files]
            builder = builders.build_files_dataset(cfg, data_dir, splits, token_level)
        text_key, pair_key, label_key = "text", ("text_pair" if cfg.text_pair_column else ""), "label"
    else:
        builder = registered_builder(cfg)
        text_key, pair_key, label_key = cfg.text_column, cfg.text_pair_column, cfg.label_column
    check_splits(builder, cfg, need_eval)
    feature = builder.info.features[label_key]
    feature = getattr(feature, "feature", feature)  # a Sequence of ClassLabel for token tasks
    label_names = tuple(cfg.label_names) or tuple(getattr(feature, "names", ()))
    if not label_names:
        raise DataError(f"data.label_names: {cfg.dataset} has no ClassLabel names for {label_key!r}; set them")
    sources = builder.as_data_source()
    eval_source = sources[cfg.eval_split] if need_eval and cfg.eval_split in sources else None
    return Sources(sources[cfg.train_split], eval_source, label_names, text_key, pair_key, label_key, token_level)


def check_splits(builder: Any, cfg: DataConfig, need_eval: bool) -> None:
    """A DataError unless the train split (and the eval split, where asked for and present) exists and holds
    examples."""
    splits = builder.info.splits
    for split in [cfg.train_split] + ([cfg.eval_split] if need_eval and cfg.eval_split in splits else []):
        if split not in splits:
            raise DataError(f"data.train_split: split {split!r} not in {cfg.dataset} (has {list(splits)})")
        if splits[split].num_examples == 0:
            raise DataError(f"{cfg.dataset}/{split}: dataset is empty")


def registered_builder(cfg: DataConfig) -> Any:
    """The prepared tfds builder of a registered dataset (e.g. glue/sst2) under data.data_dir, or a DataError."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(cfg.dataset, data_dir=cfg.data_dir or None, file_format="array_record")
    except Exception as e:  # tfds raises its own not-found types, with the whole catalogue appended
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data.dataset: {cfg.dataset!r} is not a known tfds dataset ({first})") from None
    if not builder.is_prepared():
        raise DataError(
            f"data.dataset: {cfg.dataset!r} is not prepared in array_record format under "
            f"{builder.data_dir} (prepare it with `tfds build --file_format=array_record`)"
        )
    return builder


class Encoder:
    """Tokenizes a list of records into fixed-shape numpy arrays with the checkpoint's tokenizer."""

    def __init__(self, tokenizer_dir: Path, max_length: int, sources: Sources):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as e:
            raise DataError(f"{tokenizer_dir}: cannot load the checkpoint's tokenizer ({e})") from None
        self.max_length = max_length
        self.s = sources
        # grain reads batches on several threads, and a fast tokenizer keeps its padding and truncation settings
        # on the object: calls that pad to different bucket lengths must not interleave.
        self._lock = threading.Lock()

    def _texts(self, records: list[dict[str, Any]]) -> tuple[list, list | None]:
        s = self.s
        if s.token_level:
            texts = [[as_text(w) for w in r[s.text_key]] for r in records]
        else:
            texts = [as_text(r[s.text_key]) for r in records]
        return texts, [as_text(r[s.pair_key]) for r in records] if s.pair_key else None

    def lengths(self, source: Any, chunk: int = 1024) -> np.ndarray:
        """Every example's token count (truncated at max_length, as the batches are): what bucketing sorts by."""
        out = []
        for start in range(0, len(source), chunk):
            texts, pairs = self._texts([source[i] for i in range(start, min(start + chunk, len(source)))])
            with self._lock:
                enc = self.tokenizer(
                    texts, pairs, truncation=True, max_length=self.max_length, is_split_into_words=self.s.token_level
                )
            out.extend(len(ids) for ids in enc["input_ids"])
        return np.asarray(out, np.int64)

    def __call__(self, records: list[dict[str, Any]], length: int | None = None) -> dict[str, np.ndarray]:
        """Encodes a list of records into one batch of rows `length` long (default max_length)."""
        s = self.s
        texts, pairs = self._texts(records)
        with self._lock:
            enc = self.tokenizer(
                texts,
                pairs,
                padding="max_length",
                truncation=True,
                max_length=length or self.max_length,
                return_tensors="np",
                return_token_type_ids=True,
                is_split_into_words=s.token_level,
            )
        if s.token_level:
            labels = np.stack([_align_tags(enc.word_ids(i), r[s.label_key]) for i, r in enumerate(records)])
        else:
            labels = np.asarray([int(r[s.label_key]) for r in records], np.int32)
        return {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int32),
            "token_type_ids": enc["token_type_ids"].astype(np.int32),
            "labels": labels.astype(np.int32),
            "weights": np.ones((len(records),), np.float32),
        }


def _align_tags(word_ids: list[int | None], tags) -> np.ndarray:
    """Each word's tag on its first sub-token; IGNORE on special tokens, padding and continuations."""
    out = np.full((len(word_ids),), IGNORE_LABEL, np.int32)
    previous = None
    for j, w in enumerate(word_ids):
        if w is not None and w != previous:
            out[j] = int(tags[w])
        previous = w
    return out


def as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def build_train_dataset(
    source: Any, encoder: Encoder, rows: Any, seed: int, buckets: tuple[int, ...] = ()
) -> grain.MapDataset:
    """Infinite, seeded, reshuffled every epoch. Element s is global batch s, of which this process reads and
    tokenizes only its rows (`rows.mine` of `rows.size`, a mesh.BatchRows): the batches, and so the iterator
    state, are the same whatever the process count. With `buckets`, rows are grouped by length and each batch
    is padded to the smallest bucket that holds its longest row; without, every batch to max_length."""
    size, mine = selected_rows(rows)
    if len(source) < size:
        raise DataError(f"train.batch_size: {size} is larger than the {len(source)} training examples")
    if not buckets:
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
        return ds.batch(size, drop_remainder=True, batch_fn=lambda records: encoder([records[i] for i in mine]))
    lengths = encoder.lengths(source)

    def encode(index: np.ndarray) -> dict[str, np.ndarray]:
        length = bucket_lib.bucket_for(int(lengths[index].max()), buckets)
        return encoder([source[int(index[i])] for i in mine], length)

    return bucket_lib.grouped_batches(lengths, size, seed, buckets).map(encode)


def iter_eval_batches(
    source: Any, encoder: Encoder, rows: Any, buckets: tuple[int, ...] = (), lengths: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once, `rows.size` per global batch, this process's rows of each; rows past
    the end are weight-0 copies. Every process yields the same number of batches, so collective steps stay in
    lockstep. With `buckets` (and the examples' `lengths`), examples go shortest first and each batch is padded
    to its bucket; without, in order, to max_length."""
    n, (size, mine) = len(source), selected_rows(rows)
    if buckets:
        lengths = encoder.lengths(source) if lengths is None else lengths
        batches = bucket_lib.sorted_batches(lengths, size)
    else:
        batches = [np.arange(b * size, min((b + 1) * size, n)) for b in range(-(-n // size))]
    for batch_index in batches:
        real = [int(batch_index[r]) for r in mine if r < len(batch_index)]
        length = bucket_lib.bucket_for(int(lengths[batch_index].max()), buckets) if buckets else None
        batch = encoder([source[i] for i in real or [0]], length)
        if not real:
            batch["weights"][:] = 0.0
        pad = len(mine) - len(real) if real else len(mine) - 1
        if pad:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
            batch["weights"][-pad:] = 0.0
        yield batch
