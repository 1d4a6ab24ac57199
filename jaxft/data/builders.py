"""tfds builders: the bundled review-sentiment dataset and the user's own JSONL/CSV files.

Both are prepared once in array_record format and read through `tfds.data_source` (no TensorFlow).
Registered tfds datasets (e.g. "glue/sst2") go through the same reader.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jaxft.config import DataConfig

log = logging.getLogger("jaxft.data")

REVIEWS_DIR = Path(__file__).parent / "reviews"
REVIEW_LABELS = ("negative", "positive")


class DataError(ValueError):
    """A dataset the user pointed at that cannot be used; names the file and the problem."""


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) from a .jsonl/.json-lines or .csv/.tsv file."""
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, start=2):
                yield i, row
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{i}: expected a JSON object per line")
            yield i, record


def collect_labels(files: list[Path], label_column: str) -> tuple[str, ...]:
    """Sorted distinct label values in the training files (used when data.label_names is empty)."""
    seen = set()
    for f in files:
        for i, rec in read_records(f):
            if label_column not in rec:
                raise DataError(f"{f}:{i}: missing label column {label_column!r}")
            value = rec[label_column]
            if isinstance(value, list):  # token tasks: one tag per word
                seen.update(str(v) for v in value)
            else:
                seen.add(str(value))
    return tuple(sorted(seen))


def _examples(
    files: list[Path], cfg: DataConfig, labels: tuple[str, ...], token_level: bool = False
) -> Iterator[tuple[str, dict]]:
    """Validated examples. Sequence tasks: a text and one label. Token tasks: a list of words and a
    list of tags of the same length."""
    index = {name: i for i, name in enumerate(labels)}
    count = 0
    for f in files:
        for i, rec in read_records(f):
            for col in (cfg.text_column, cfg.label_column) + ((cfg.text_pair_column,) if cfg.text_pair_column else ()):
                if col not in rec:
                    raise DataError(f"{f}:{i}: missing column {col!r}")
            text, label = rec[cfg.text_column], rec[cfg.label_column]
            if token_level:
                text, label = _check_tokens(f, i, cfg, text, label)
            elif not isinstance(text, str):
                raise DataError(f"{f}:{i}: column {cfg.text_column!r} must be a string")
            tags = label if token_level else [label]
            for tag in tags:
                if str(tag) not in index:
                    raise DataError(f"{f}:{i}: label {str(tag)!r} is not in the label set {list(labels)}")
            ids = [index[str(t)] for t in tags]
            count += 1
            pair = str(rec.get(cfg.text_pair_column, ""))
            yield f"{f.name}:{i}", {"text": text, "text_pair": pair, "label": ids if token_level else ids[0]}
    if count == 0:
        raise DataError(f"{', '.join(str(f) for f in files)}: dataset is empty")


def _check_tokens(f: Path, i: int, cfg: DataConfig, words, tags) -> tuple[list[str], list]:
    if not (isinstance(words, list) and all(isinstance(w, str) for w in words)) or not words:
        raise DataError(f"{f}:{i}: column {cfg.text_column!r} must be a non-empty list of words for token tasks")
    if not isinstance(tags, list) or len(tags) != len(words):
        raise DataError(f"{f}:{i}: column {cfg.label_column!r} must list one tag per word ({len(words)} words)")
    return words, tags


class FilesConfig(tfds.core.BuilderConfig):
    def __init__(
        self, *, splits: dict[str, list[Path]], data: DataConfig, labels: tuple[str, ...], token_level: bool, **kw
    ):
        h = hashlib.sha256()
        for split, files in sorted(splits.items()):
            for f in files:
                h.update(f"{split}:{f.resolve()}:".encode())
                h.update(Path(f).read_bytes() if Path(f).is_file() else b"<missing>")
        h.update(json.dumps([data.text_column, data.text_pair_column, data.label_column, labels, token_level]).encode())
        # The config name is a content hash: edited files or columns prepare a new copy, never a stale one.
        super().__init__(name=h.hexdigest()[:16], version=tfds.core.Version("1.0.0"), **kw)
        self.splits, self.data, self.labels, self.token_level = splits, data, labels, token_level


class JaxftFiles(tfds.core.GeneratorBasedBuilder):
    """Sequence or token classification from your own JSONL/CSV files with configurable columns."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.ClassLabel(names=list(self.builder_config.labels))
        token_level = self.builder_config.token_level
        return tfds.core.DatasetInfo(
            builder=self,
            description="User-provided classification files.",
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Sequence(tfds.features.Text()) if token_level else tfds.features.Text(),
                    "text_pair": tfds.features.Text(),
                    "label": tfds.features.Sequence(label) if token_level else label,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(files) for split, files in self.builder_config.splits.items()}

    def _generate_examples(self, files):
        c = self.builder_config
        yield from _examples(files, c.data, c.labels, c.token_level)


def build_files_dataset(
    cfg: DataConfig, data_dir: str, splits: dict[str, list[Path]], token_level: bool = False
) -> tfds.core.DatasetBuilder:
    for files in splits.values():
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"{f}: data file does not exist")
    labels = tuple(cfg.label_names) or collect_labels(splits[cfg.train_split], cfg.label_column)
    if not labels:
        raise DataError(f"{', '.join(map(str, splits[cfg.train_split]))}: dataset is empty")
    builder = JaxftFiles(
        config=FilesConfig(splits=splits, data=cfg, labels=labels, token_level=token_level),
        data_dir=data_dir,
        file_format="array_record",
    )
    prepare(builder, download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return builder


def prepare(builder: tfds.core.DatasetBuilder, **kwargs) -> None:
    """builder.download_and_prepare(**kwargs), with the lines tfds prints on stdout ("Downloading and preparing
    dataset ...", "... downloaded and prepared to ...") logged at debug instead, as the CLI quiets tfds's own
    logging: a command's stdout carries only its own output, and a prepare that fails stays one line."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            builder.download_and_prepare(**kwargs)
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("tfds: %s", line.strip())


class JaxftReviews(tfds.core.GeneratorBasedBuilder):
    """Customer-review sentiment (negative/positive) written for jaxft: 640 train, 160 test, balanced."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "text_pair": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(REVIEW_LABELS)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(REVIEWS_DIR / "train.jsonl"),
            "test": self._generate_examples(REVIEWS_DIR / "test.jsonl"),
        }

    def _generate_examples(self, path):
        yield from _examples([path], DataConfig(), REVIEW_LABELS)


def build_reviews_dataset(data_dir: str) -> tfds.core.DatasetBuilder:
    builder = JaxftReviews(data_dir=data_dir, file_format="array_record")
    prepare(builder)
    return builder
