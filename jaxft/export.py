"""Export of a run's checkpoint as a standard Hugging Face folder (config, safetensors, tokenizer files).

Streams one tensor at a time from the devices into the files; it must never hold the whole model on the host,
and never leaves a half-written folder behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxft.checkpoint import RunCheckpointError
from jaxft.models import BertSpec, bert_hf
from jaxft.paths import path_str
from jaxft.predict import load_run_model, read_run

log = logging.getLogger("jaxft.export")

# HF's own size strings are decimal ("2GB" = 2e9 bytes); shards of at most this many bytes unless one tensor is bigger.
DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
SAFETENSORS_CODES = {
    np.dtype(np.float64): "F64",
    DTYPES["float32"]: "F32",
    DTYPES["bfloat16"]: "BF16",
    DTYPES["float16"]: "F16",
}

# Everything a BERT-family tokenizer may need; whichever of these the pretrained folder has is copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)

# model_type -> (transformers class name stem, attribute holding the encoder). Every RoBERTa variant's task
# class keeps its encoder in `self.roberta` (base_model_prefix "roberta"), whatever the model_type.
ARCHITECTURES = {
    "bert": ("Bert", "bert."),
    "roberta": ("Roberta", "roberta."),
    "xlm-roberta": ("XLMRoberta", "roberta."),
    "camembert": ("Camembert", "roberta."),
}
TASK_CLASSES = {
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of the exported file: its HF key, the jaxft parameter it comes from, and its layout."""

    key: str
    path: str
    kind: str  # a bert_hf layout kind (copy, flat, linear1, linear2)
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ------------------------------------------------------------------------------------------------ export


def export_run(
    run_dir: Path,
    out_dir: Path,
    step: int | None = None,
    dtype: str = "float32",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes step `step` (default: the latest complete) of a run as an HF model folder at `out_dir`.

    Every process joins the gathers; process 0 alone writes, into a temporary sibling that is renamed into
    place only when complete. Files bigger than `max_shard_bytes` are split into HF's sharded layout.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"{out_dir}: unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if max_shard_bytes <= 0:
        raise ExportError(f"{out_dir}: max_shard_bytes must be positive, got {max_shard_bytes}")
    if not (run_dir / "run.json").is_file():
        raise ExportError(f"{run_dir}: not a jaxft run dir (no run.json)")
    _on_process0(lambda: check_out_dir(out_dir))
    try:
        family = read_run(run_dir).get("family", "bert")
        if family != "bert":
            raise ExportError(f"{run_dir}: export of {family} (decoder) runs is not supported yet")
        _, params, meta, _, step = load_run_model(run_dir, step)
    except RunCheckpointError as e:
        raise ExportError(str(e)) from e
    spec = BertSpec(**meta["spec"])
    model_type = meta["hf_config"].get("model_type", "")
    tensors = plan_tensors(params, spec, model_type, DTYPES[dtype], run_dir)
    config = make_hf_config(meta, spec, dtype)
    source = Path(meta["source"]["path"])
    arrays = iter_hf_arrays(params, tensors)
    _on_process0(lambda: write_folder(out_dir, tensors, arrays, config, source, max_shard_bytes), drain=arrays)
    log.info("exported step %d of %s to %s", step, run_dir, out_dir)
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuses anything but a missing or empty folder: an export never replaces files."""
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise ExportError(f"{out_dir}: already exists and is not empty; refusing to overwrite")
    elif out_dir.exists():
        raise ExportError(f"{out_dir}: already exists and is not a folder; refusing to overwrite")


def _on_process0(work: Callable[[], None], drain: Iterable[Any] = ()) -> None:
    """Runs `work` on process 0 only, then makes every process raise if it failed.

    `drain` is a stream of collectives: the other processes run through it while process 0 consumes it in
    `work`, and process 0 finishes it after a failure, so no process waits forever in a gather.
    """
    error: Exception | None = None
    if jax.process_index() == 0:
        try:
            work()
        except Exception as e:  # re-raised below, once the other processes know
            error = e
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    for _ in drain:
        pass
    failed = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise ExportError("export failed on process 0 (its error message says why)")


# ---------------------------------------------------------------------------------------------- planning


def plan_tensors(params: Any, spec: BertSpec, model_type: str, dtype: np.dtype, run_dir: Path) -> list[HFTensor]:
    """The HF tensors to write, in parameter order; every key the HF class holds must be among them."""
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{run_dir}: model_type {model_type!r} has no transformers class to export to")
    prefix = ARCHITECTURES[model_type][1]
    tensors, problems = [], []
    for p, var in params.flat_state():
        path = path_str(p)
        entry = bert_hf.hf_key_for(path, prefix)
        if entry is None:
            problems.append(f"{path} has no HF key")
            continue
        key, kind = entry
        src = np.dtype(var.get_value().dtype)
        out = dtype if jnp.issubdtype(src, jnp.floating) else src  # only float tensors take --dtype
        tensors.append(HFTensor(key, path, kind, bert_hf.hf_shape(kind, tuple(var.shape)), out))
    have = {t.key for t in tensors}
    needed = hf_state_keys(spec, prefix)
    problems += [f"the HF class needs {k}, which the run has no parameter for" for k in sorted(needed - have)]
    problems += [f"{k} is not a tensor of the HF class" for k in sorted(have - needed)]
    if problems:
        raise ExportError(f"{run_dir}: cannot export as {architecture(spec, model_type)}: " + "; ".join(problems))
    return tensors


def architecture(spec: BertSpec, model_type: str) -> str:
    return ARCHITECTURES[model_type][0] + TASK_CLASSES[spec.task]


def hf_state_keys(spec: BertSpec, prefix: str) -> set[str]:
    """The state-dict keys of the transformers task class, written out from its modeling code rather than
    derived from our key table, so a parameter the table (or the model) lacks is caught here instead of being
    left at random init by `from_pretrained`. Bert*/Roberta* token classes and Roberta* sequence classes
    have no pooler; Roberta* sequence classes have a two-layer head."""
    w_b = ("weight", "bias")
    embeddings = ["word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight"]
    keys = {f"{prefix}embeddings.{n}" for n in embeddings} | {f"{prefix}embeddings.LayerNorm.{w}" for w in w_b}
    modules = [f"attention.self.{m}" for m in ("query", "key", "value")] + [
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ]
    keys |= {f"{prefix}encoder.layer.{i}.{m}.{w}" for i in range(spec.num_layers) for m in modules for w in w_b}
    sequence = spec.task == "sequence-classification"
    if sequence and spec.family == "bert":
        keys |= {f"{prefix}pooler.dense.{w}" for w in w_b}
    heads = ("classifier.dense", "classifier.out_proj") if sequence and spec.family == "roberta" else ("classifier",)
    return keys | {f"{h}.{w}" for h in heads for w in w_b}


def make_hf_config(meta: dict[str, Any], spec: BertSpec, dtype: str) -> dict[str, Any]:
    """The pretrained config.json with this run's head: labels, task class and dtype."""
    labels = list(meta.get("label_names") or [f"LABEL_{i}" for i in range(spec.num_labels)])
    if len(labels) != spec.num_labels:
        raise ExportError(f"run.json: {len(labels)} label names for a head of {spec.num_labels} labels")
    config = dict(meta["hf_config"])
    config.pop("problem_type", None)  # the pretrained head's, not this run's
    config.update(
        architectures=[architecture(spec, config["model_type"])],
        num_labels=len(labels),
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
        dtype=dtype,
        torch_dtype=dtype,  # what transformers v4 reads; v5 reads `dtype`
    )
    if spec.task == "sequence-classification":
        config["problem_type"] = "single_label_classification"  # jaxft trains a softmax head
    return config


def split_shards(tensors: list[HFTensor], max_shard_bytes: int) -> list[list[HFTensor]]:
    """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets a shard of its own), as HF does."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


# ---------------------------------------------------------------------------------------------- writing


def gather(x: jax.Array) -> np.ndarray:
    """The whole of one global array on this host. With several processes every one of them must call it."""
    if jax.process_count() == 1:
        # A jax.Array caches its host copy for its lifetime, and the parameters outlive the export: fetched
        # directly, every tensor would stay on the host. A throwaway array over the same device buffers (no
        # device copy) takes the cache with it.
        view = jax.make_array_from_single_device_arrays(x.shape, x.sharding, [s.data for s in x.addressable_shards])
        return np.asarray(jax.device_get(view))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def iter_hf_arrays(params: Any, tensors: list[HFTensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array in HF layout and export dtype), one tensor at a time, in `tensors` order."""
    values = {path_str(p): var.get_value() for p, var in params.flat_state()}
    for t in tensors:
        host = bert_hf.to_hf(t.kind, gather(values[t.path]))
        yield t.key, host.astype(t.dtype, copy=False)
        del host  # before the next gather


def write_folder(
    out_dir: Path,
    tensors: list[HFTensor],
    arrays: Iterator[tuple[str, np.ndarray]],
    config: dict[str, Any],
    source: Path,
    max_shard_bytes: int,
) -> None:
    """Builds the folder in a temporary sibling and renames it into place; a failure removes the sibling."""
    if not source.is_dir():
        raise ExportError(f"{source}: the run's pretrained folder is gone; its tokenizer files are needed")
    check_out_dir(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # not mkdtemp: that one is private (0700), and this folder becomes the export
        write_weights(tmp, tensors, arrays, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
        for name in copied:
            shutil.copyfile(source / name, tmp / name)
        if not copied:
            log.warning("%s: no tokenizer files to copy; the export has weights and config only", source)
        os.replace(tmp, out_dir)  # replaces only a missing or empty folder, so nothing is ever overwritten
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"{out_dir}: export failed, nothing written ({type(e).__name__}: {e})") from e
        raise


def write_weights(
    folder: Path, tensors: list[HFTensor], arrays: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int
) -> list[str]:
    """model.safetensors, or HF's numbered shards plus model.safetensors.index.json; returns the file names."""
    shards = split_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, shard in zip(names, shards):
        with SafetensorsWriter(folder / name, [(t.key, t.shape, t.dtype) for t in shard]) as writer:
            for _, (key, array) in zip(shard, arrays):  # shard first: zip must not pull a tensor it won't write
                writer.write(key, array)
                del array  # before the next gather, so the host holds one tensor at a time
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.key: name for name, shard in zip(names, shards) for t in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


class SafetensorsWriter:
    """Writes one .safetensors file a tensor at a time (the safetensors library needs all tensors at once).

    The layout: an 8-byte little-endian header length, the JSON header (dtype, shape and data_offsets of every
    tensor, known from the shapes alone), then each tensor's raw little-endian bytes in header order.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # "pt": what transformers checks for
        offset = 0
        for name, shape, dtype in entries:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows trailing spaces; aligned data can be mapped in place
        self.path = path
        self._pending = [(name, tuple(shape), dtype) for name, shape, dtype in entries]
        self._file = open(path, "xb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        """Appends the next tensor; it must be the one the header lists next."""
        got = (name, tuple(array.shape), array.dtype)
        if not self._pending or self._pending[0] != got:
            want = self._pending[0] if self._pending else "nothing"
            raise ValueError(f"{self.path}: expected {want} next, got {got}")
        self._pending.pop(0)
        if sys.byteorder != "little":
            array = array.byteswap()
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        if self._pending:
            self._file.close()
            raise ValueError(f"{self.path}: closed before {self._pending[0][0]} was written")
        self._file.flush()
        os.fsync(self._file.fileno())  # the folder is renamed into place next; its files must be on disk first
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
