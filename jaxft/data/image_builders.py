"""tfds builders of the user's images: an image folder (one subfolder per class) or JSONL/CSV rows of
{image path, label}. Each image's encoded bytes are stored as they are, in array_record, after one full decode at
prepare time: an unreadable or truncated file stops the prepare with its name, or (data.bad_images=skip) is left
out and counted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
from pathlib import Path

import tensorflow_datasets as tfds

from jaxft.config import DataConfig
from jaxft.data import images
from jaxft.data.builders import DataError, prepare, read_records

log = logging.getLogger("jaxft.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SKIPPED_FILE = "skipped_images.json"  # beside the prepared data: what data.bad_images=skip left out


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of an image folder; DataError when it is missing or holds fewer than two."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        found = f" ({folders[0].name})" if folders else ""
        raise DataError(
            f"{root}: an image folder needs one subfolder per class, two or more; found {len(folders)}{found}"
        )
    return folders


def scan_folder(root: Path, labels: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(image, class name) for every image under each class folder (subfolders included), in sorted order."""
    rows = []
    for folder in class_folders(root):
        if folder.name not in labels:
            raise DataError(f"{folder}: class {folder.name!r} is not in data.label_names {list(labels)}")
        found = sorted(p for p in folder.rglob("*") if is_image(p))
        if not found:
            raise DataError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        rows += [(p, folder.name) for p in found]
    return rows


def scan_files(files: list[Path], data: DataConfig) -> list[tuple[Path, str]]:
    """(image, label) for every row of JSONL/CSV files; relative image paths are taken from the file's folder."""
    rows = []
    for f in files:
        for i, rec in read_records(f):
            for col in (data.image_column, data.label_column):
                if col not in rec:
                    raise DataError(f"{f}:{i}: missing column {col!r}")
            path = Path(str(rec[data.image_column])).expanduser()
            path = path if path.is_absolute() else f.parent / path
            if not path.is_file():
                raise DataError(f"{f}:{i}: image {path} does not exist")
            rows.append((path, str(rec[data.label_column])))
    if not rows:
        raise DataError(f"{', '.join(map(str, files))}: dataset is empty")
    return rows


class ImagesConfig(tfds.core.BuilderConfig):
    def __init__(
        self,
        *,
        splits: dict[str, list[tuple[Path, str]]],
        labels: tuple[str, ...],
        bad_images: str,
        threads: int = 1,
        **kw,
    ):
        h = hashlib.sha256(json.dumps([labels, bad_images]).encode())
        for split, rows in sorted(splits.items()):
            for path, label in rows:
                stat = path.stat()
                h.update(f"{split}:{path.resolve()}:{label}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        # A content key: an added, removed, relabelled or rewritten image prepares a new copy, never a stale one.
        super().__init__(name=h.hexdigest()[:16], version=tfds.core.Version("1.0.0"), **kw)
        self.splits, self.labels, self.bad_images = splits, labels, bad_images
        self.threads = threads  # that decode the images at prepare time; not part of the content key
        self.skipped: dict[str, list[str]] = {}


class JaxftImages(tfds.core.GeneratorBasedBuilder):
    """Image classification from your own image folders or {image, label} files."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="User-provided images.",
            features=tfds.features.FeaturesDict(
                {
                    # The file's own bytes (any format PIL reads); decoded by jaxft's workers, not by tfds.
                    "image": tfds.features.Image(shape=(None, None, None)),
                    "label": tfds.features.ClassLabel(names=list(self.builder_config.labels)),
                    "path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, rows) for split, rows in self.builder_config.splits.items()}

    def _generate_examples(self, split, rows):
        c = self.builder_config
        skipped = c.skipped.setdefault(split, [])
        with concurrent.futures.ThreadPoolExecutor(max(1, c.threads)) as pool:
            # Read and decode on c.threads threads (PIL releases the GIL), a chunk at a time: the bytes of at most
            # CHECK_CHUNK images are held at once, and the examples come out in order.
            for start in range(0, len(rows), CHECK_CHUNK):
                chunk = rows[start : start + CHECK_CHUNK]
                for (path, label), (data, error) in zip(chunk, pool.map(_read_checked, chunk)):
                    if error is not None:
                        if c.bad_images != "skip":
                            raise DataError(
                                f"{path}: unreadable image ({error}); data.bad_images=skip leaves such files out"
                            )
                        skipped.append(f"{path}: {error}")
                        continue
                    yield str(path), {"image": data, "label": label, "path": str(path)}
        if len(skipped) == len(rows):
            raise DataError(f"{split}: every image is unreadable (first: {skipped[0]})")


CHECK_CHUNK = 256  # images read and decoded together at prepare time


def _read_checked(row: tuple[Path, str]) -> tuple[bytes, str | None]:
    """An image file's bytes, and why they do not decode (None when they do)."""
    data = row[0].read_bytes()
    try:
        images.decode_rgb(data)
    except images.ImageDecodeError as e:
        return data, str(e)
    return data, None


def build_image_dataset(
    data: DataConfig,
    data_dir: str,
    splits: dict[str, list[tuple[Path, str]]],
    labels: tuple[str, ...],
    threads: int = 1,
) -> tfds.core.DatasetBuilder:
    """Prepares (once per content) and returns the builder; logs what data.bad_images=skip left out."""
    config = ImagesConfig(splits=splits, labels=labels, bad_images=data.bad_images, threads=threads)
    builder = JaxftImages(config=config, data_dir=data_dir, file_format="array_record")
    record = Path(builder.data_dir) / SKIPPED_FILE
    if not builder.is_prepared():
        prepare(builder)
        record.write_text(json.dumps(config.skipped, indent=1))
    skipped = json.loads(record.read_text()) if record.is_file() else {}
    for split, lines in skipped.items():
        if lines:
            log.warning(
                "data.bad_images=skip: left out %d unreadable image(s) of %s (first: %s)", len(lines), split, lines[0]
            )
    return builder


def image_splits(data: DataConfig) -> tuple[dict[str, list[tuple[Path, str]]], tuple[str, ...]]:
    """The splits' (image, label name) rows and the label names, for data.dataset imagefolder or files."""
    if data.dataset == "imagefolder":
        root = Path(data.train_dir).expanduser()
        labels = tuple(data.label_names) or tuple(p.name for p in class_folders(root))
        splits = {data.train_split: scan_folder(root, labels)}
        if data.eval_dir:
            splits[data.eval_split] = scan_folder(Path(data.eval_dir).expanduser(), labels)
        return splits, labels
    splits = {data.train_split: scan_files([Path(f) for f in data.train_files], data)}
    if data.eval_files:
        splits[data.eval_split] = scan_files([Path(f) for f in data.eval_files], data)
    labels = tuple(data.label_names) or tuple(sorted({label for _, label in splits[data.train_split]}))
    for rows in splits.values():
        for path, label in rows:
            if label not in labels:
                raise DataError(f"{path}: label {label!r} is not in the label set {list(labels)}")
    if len(labels) < 2:
        raise DataError(f"{data.train_files[0]}: image classification needs two or more labels, found {list(labels)}")
    return splits, labels
