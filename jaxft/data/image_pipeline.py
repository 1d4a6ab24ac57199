"""Image sources → grain pipelines → per-process numpy batches of pixels: the user's image folders and files (through
image_builders) or a registered tfds image dataset, read as encoded bytes, then decoded and augmented in grain's
worker threads one image at a time, so that a batch's images decode in parallel. Iterator state is checkpointable
and, as for text, the same whatever the process count: every random draw is a function of the seed and the image's
position in the global order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxft.config import ConfigError, DataConfig
from jaxft.data import image_builders, images, pipeline, selected_rows
from jaxft.data.builders import DataError


@dataclasses.dataclass
class ImageSources:
    train: Any  # random-access data source of {image_key: encoded bytes, label_key: class index}
    eval: Any | None
    label_names: tuple[str, ...]
    image_key: str
    label_key: str


def open_image_sources(cfg: DataConfig, need_eval: bool = True) -> ImageSources:
    """Prepares (once per content) and opens the train and eval splits, their images left encoded."""
    import tensorflow_datasets as tfds

    if cfg.dataset in ("imagefolder", "files"):
        splits, labels = image_builders.image_splits(cfg)
        data_dir = cfg.data_dir or pipeline.default_data_dir()
        builder = image_builders.build_image_dataset(cfg, data_dir, splits, labels, workers(cfg))
        image_key, label_key = "image", "label"
    else:
        builder = pipeline.registered_builder(cfg)
        image_key, label_key = cfg.image_column, cfg.label_column
    features = builder.info.features
    for key, kind in ((image_key, tfds.features.Image), (label_key, tfds.features.ClassLabel)):
        if key not in features or not isinstance(features[key], kind):
            column = "image_column" if key == image_key else "label_column"
            raise DataError(
                f"data.{column}: {cfg.dataset} has no {kind.__name__} feature {key!r} (features: {list(features)})"
            )
    pipeline.check_splits(builder, cfg, need_eval)
    label_names = tuple(cfg.label_names) or tuple(features[label_key].names)
    if len(label_names) < 2:
        raise DataError(f"{cfg.dataset}: image classification needs two or more labels, found {list(label_names)}")
    sources = builder.as_data_source(decoders={image_key: tfds.decode.SkipDecoding()})
    eval_source = sources[cfg.eval_split] if need_eval and cfg.eval_split in sources else None
    return ImageSources(sources[cfg.train_split], eval_source, label_names, image_key, label_key)


def label_names(cfg: DataConfig) -> tuple[str, ...]:
    """The label names alone, without preparing anything (what `jaxft plan` needs for the head's shape): an image
    folder's class folders, the labels of the files' rows, or a registered dataset's ClassLabel names."""
    if cfg.dataset == "imagefolder":
        root = Path(cfg.train_dir).expanduser()
        return tuple(cfg.label_names) or tuple(p.name for p in image_builders.class_folders(root))
    if cfg.dataset == "files":
        return image_builders.image_splits(cfg)[1]
    return open_image_sources(cfg, need_eval=False).label_names


@dataclasses.dataclass(frozen=True)
class ImageTransforms:
    """A run's train augmentation, eval transform and mixing, at the model's input size."""

    train: images.TrainTransform
    eval: images.EvalTransform
    mixing: images.Mixing

    @classmethod
    def build(cls, data: DataConfig, folder: Path, size: int) -> ImageTransforms:
        norm = images.image_stats(folder, data.image_mean, data.image_std)
        train = images.TrainTransform(
            size,
            norm,
            tuple(data.crop_scale),
            tuple(data.crop_ratio),
            data.flip,
            data.randaugment_ops,
            data.randaugment_magnitude,
        )
        return cls(
            train,
            images.EvalTransform.build(size, data.crop_fraction, norm),
            images.Mixing(data.mixup_alpha, data.cutmix_alpha),
        )

    def record(self) -> dict[str, Any]:
        """What run.json keeps of the transforms: predict and export rebuild the eval transform from it."""
        return self.eval.record()


def workers(data: DataConfig) -> int:
    return data.workers or min(16, os.cpu_count() or 1)


def _read(source: Any, index: int, image_key: str) -> Any:
    record = source[index]
    try:
        return record, images.decode_rgb(record[image_key])
    except images.ImageDecodeError as e:
        where = pipeline.as_text(record["path"]) if "path" in record else f"example {index}"
        raise DataError(f"{where}: unreadable image ({e})") from None


def build_train_dataset(
    sources: ImageSources, transforms: ImageTransforms, rows: Any, seed: int, threads: int
) -> GlobalBatches:
    """Infinite, seeded, reshuffled every epoch. Batch s is global batch s of the shuffled order, of which this
    process decodes and augments only its rows (`rows.mine` of `rows.size`, a mesh.BatchRows), one image per
    worker task. Mixup and cutmix blend rows 2k and 2k+1 of the global batch, so a process's rows must come in
    such pairs."""
    size, mine = selected_rows(rows)
    source, n = sources.train, len(sources.train)
    if n < size:
        raise DataError(f"train.batch_size: {size} is larger than the {n} training examples")
    mixing = transforms.mixing
    group = 2 if mixing.enabled else 1  # rows decoded together: a mixed pair needs both images
    if mixing.enabled and (
        len(mine) % 2 or any(int(a) % 2 or int(b) != int(a) + 1 for a, b in zip(mine[::2], mine[1::2]))
    ):
        raise ConfigError(
            "data.mixup_alpha/cutmix_alpha: mixing blends rows 2k and 2k+1 of a batch, and this process's "
            f"{len(mine)} rows of the {size} per batch do not come in such pairs (make each process's share even)"
        )
    firsts = np.asarray(mine[::group])
    order = grain.MapDataset.range(n).seed(seed).shuffle().repeat(None)
    per_batch = len(firsts)

    def load(k: int, unit: int) -> dict[str, np.ndarray]:
        first = (k // per_batch) * size + int(firsts[unit])  # the unit's first row, as a global position
        pixels, labels = [], []
        for position in range(first, first + group):
            record, image = _read(source, int(order[position]), sources.image_key)
            pixels.append(transforms.train(image, np.random.default_rng([seed, position])))
            labels.append(int(record[sources.label_key]))
        mix_labels, weights = list(labels), [1.0] * group
        if mixing.enabled:
            a, b, w = mixing.mix_pair(pixels[0], pixels[1], np.random.default_rng([seed, first, 1]))
            pixels, mix_labels, weights = [a, b], labels[::-1], [w, w]
        return {
            "pixel_values": np.stack(pixels).astype(np.float32),
            "labels": np.asarray(labels, np.int32),
            "mix_labels": np.asarray(mix_labels, np.int32),
            "mix_weights": np.asarray(weights, np.float32),
        }

    units = grain.MapDataset.range(per_batch).repeat(None).map_with_index(load)
    iter_ds = units.to_iter_dataset(_read_options(threads, len(mine)))
    return GlobalBatches(iter_ds.batch(per_batch, drop_remainder=True, batch_fn=_concat), per_batch)


class GlobalBatches:
    """A process's batch iterator whose state counts global batches: grain's counts this process's units, whose
    number per batch depends on the process count, and a checkpoint's one state must resume every process at the
    same batch whatever their count."""

    def __init__(self, dataset: grain.IterDataset, units_per_batch: int):
        self.dataset, self.units_per_batch = dataset, units_per_batch

    def __iter__(self) -> _GlobalBatchIterator:
        return _GlobalBatchIterator(iter(self.dataset), self.units_per_batch)


class _GlobalBatchIterator:
    def __init__(self, it: Any, units_per_batch: int):
        self.it, self.units_per_batch, self.batches = it, units_per_batch, 0

    def __iter__(self) -> _GlobalBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.it)
        self.batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"global_batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        if "global_batches" not in state:
            raise DataError(f"data: the checkpoint's iterator state {state} is not an image pipeline's")
        self.batches = int(state["global_batches"])
        self.it.set_state({"next_index": self.batches * self.units_per_batch})


def _read_options(threads: int, rows_per_batch: int) -> grain.ReadOptions:
    # Elements are images (or pairs): two batches ahead keeps the step fed without holding many batches of pixels.
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * rows_per_batch, 2 * threads))


def _concat(units: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batch = {k: np.concatenate([u[k] for u in units]) for k in units[0]}
    batch["weights"] = np.ones((len(batch["labels"]),), np.float32)
    return batch


def iter_image_batches(
    n: int,
    read: Callable[[int], tuple[Any, int]],
    transform: images.EvalTransform,
    rows: Any,
    threads: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Examples 0..n-1 once each, in order, `rows.size` per global batch, this process's rows of each, through
    `transform`; `read(i)` gives example i's RGB image and label. Rows past the end are weight-0 blanks, and every
    process yields the same number of batches, so collective steps stay in lockstep."""
    size, mine = selected_rows(rows)
    batches, per_batch = -(-n // size), len(mine)
    blank = np.zeros((3, transform.size, transform.size), np.float32)

    def load(k: int) -> dict[str, np.ndarray]:
        position = (k // per_batch) * size + int(mine[k % per_batch])
        if position >= n:
            return {"pixel_values": blank, "labels": np.int32(0), "weights": np.float32(0.0)}
        image, label = read(position)
        return {"pixel_values": transform(image), "labels": np.int32(label), "weights": np.float32(1.0)}

    ds = grain.MapDataset.range(batches * per_batch).map(load).to_iter_dataset(_read_options(threads, per_batch))
    for batch in ds.batch(per_batch, drop_remainder=True):
        batch["mix_labels"] = batch["labels"]
        batch["mix_weights"] = np.ones_like(batch["weights"])
        yield batch


def iter_eval_batches(
    sources: ImageSources, transform: images.EvalTransform, rows: Any, threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every eval example exactly once, through the eval transform."""
    source = sources.eval

    def read(i: int) -> tuple[Any, int]:
        record, image = _read(source, i, sources.image_key)
        return image, int(record[sources.label_key])

    return iter_image_batches(len(source), read, transform, rows, threads)
