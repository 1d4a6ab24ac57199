"""Streaming safetensors output: one file written a tensor at a time, and HF's sharded layout (numbered files
plus an index) over a size limit. Knows nothing of models or runs; export decides what goes in."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np

SAFETENSORS_CODES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}


class TensorEntry(Protocol):
    """One tensor to write: its key, shape, dtype and size (export's HFTensor)."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int: ...


def split_shards(tensors: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets a shard of its own), as HF does."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_weights(
    folder: Path,
    tensors: Sequence[TensorEntry],
    arrays: Iterator[tuple[str, np.ndarray]],
    max_shard_bytes: int,
    stem: str = "model",
) -> list[str]:
    """STEM.safetensors, or HF's numbered shards plus STEM.safetensors.index.json; returns the file names."""
    shards = split_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
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
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
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
