"""The HF tensor layouts every family's key table is written in: the layout kinds, `HFEntry` (the HF tensors behind one
jaxft parameter), the table lookup shared by the decoders, and the reshapes between HF tensors and jaxft parameters
(whole, one device block, or one layer of a stacked parameter at a time).

It names and reshapes only; reading and writing files is load.py's and export.py's job.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Sequence

import numpy as np


class ArchitectureError(ValueError):
    """A checkpoint of a family no key table describes, or a setting of a known family that jaxft does not support."""


class Kind(enum.Enum):
    """How one HF tensor holds one jaxft parameter (or one layer of a stacked one)."""

    def __new__(cls, value: str, input_dims: int, doc: str):
        member = object.__new__(cls)
        member._value_ = value
        member.input_dims = input_dims
        member.__doc__ = doc
        return member

    COPY = ("copy", 0, "The same shape on both sides.")
    FLAT = ("flat", 0, "HF keeps it flat ([N*H]); jaxft splits it ([N, H]), a plain reshape.")
    LINEAR1 = ("linear1", 1, "A torch Linear weight [out, in] -> kernel [in, out...]: transposed, one input dim.")
    LINEAR2 = ("linear2", 2, "As LINEAR1 with two input dims (attention output: kernel [N, H, E] <- weight [E, N*H]).")
    CONV1 = ("conv1", 1, "GPT-2's Conv1D weight, already [in, out]: a plain reshape to kernel [in, out...].")
    CONV2 = ("conv2", 2, "As CONV1 with two input dims (GPT-2's attention output projection).")
    PATCH = ("patch", 0, "A torch Conv2d patch embedding [out, in, p, p] -> kernel [p, p, in, out] (channels last).")
    GRID = (
        "grid",
        0,
        "A ViT position table [1, S + g*g, E] (S special tokens, then a g x g patch grid): copied, or, when the "
        "model's grid differs from the checkpoint's, the grid resampled bicubically and the S rows kept.",
    )

    @property
    def is_matrix(self) -> bool:
        """A weight matrix of a Linear or Conv1D layer (what LoRA adapters sit on)."""
        return self.input_dims > 0

    @property
    def layer_type(self) -> str:
        """ "linear" or "conv" for matrices (PEFT's fan_in_fan_out tells them apart), "" otherwise."""
        return self.value.rstrip("12") if self.is_matrix else ""

    def accepts(self, found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
        """Whether an HF tensor of shape `found` can hold a parameter whose HF shape is `expected`."""
        if self is Kind.GRID and len(found) == len(expected) == 3:
            return found[0] == expected[0] and found[2] == expected[2] and grid_split(found[1]) is not None
        return tuple(found) == tuple(expected)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape that holds a jaxft parameter of `shape`."""
        if self in (Kind.COPY, Kind.GRID):
            return tuple(shape)
        if self is Kind.FLAT:
            return (math.prod(shape),)
        if self is Kind.PATCH:
            return (shape[3], shape[2], shape[0], shape[1])
        fan_in, fan_out = math.prod(shape[: self.input_dims]), math.prod(shape[self.input_dims :])
        return (fan_in, fan_out) if self.value.startswith("conv") else (fan_out, fan_in)

    def to_jaxft(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """An HF tensor as the jaxft parameter of `shape`."""
        if self is Kind.GRID:
            return tensor if tuple(tensor.shape) == tuple(shape) else resample_grid(tensor, shape)
        if self is Kind.PATCH:
            return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
        if self.value.startswith("linear"):
            return np.ascontiguousarray(tensor.T).reshape(shape)
        return tensor.reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        """A jaxft parameter as its HF tensor."""
        if self in (Kind.COPY, Kind.GRID):
            return array
        if self is Kind.PATCH:
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        if self is Kind.FLAT:
            return array.reshape(-1)
        matrix = array.reshape(math.prod(array.shape[: self.input_dims]), -1)
        return matrix if self.value.startswith("conv") else np.ascontiguousarray(matrix.T)


def grid_split(tokens: int) -> tuple[int, int] | None:
    """(special tokens, grid side) of a position table of `tokens` rows: 1 or 2 special rows ([CLS], DeiT's
    distillation token) before a square grid; None when no such split exists."""
    side = math.isqrt(max(tokens - 1, 0))
    special = tokens - side * side
    return (special, side) if side > 1 and special in (1, 2) else None


def resample_grid(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A [1, S + g*g, E] position table as [1, S + h*h, E]: the S special rows kept, the g x g grid resized to
    h x h by bicubic interpolation (jax.image.resize, Keys' cubic, antialiased when shrinking)."""
    import jax

    (special, side), (new_special, new_side) = grid_split(table.shape[1]), grid_split(shape[1])
    if special != new_special:
        raise ValueError(f"position table of {special} special tokens, the model has {new_special}")
    grid = table[0, special:].reshape(side, side, table.shape[2])
    with jax.default_device(jax.devices("cpu")[0]):
        resized = np.asarray(jax.image.resize(grid.astype(np.float32), (new_side, new_side, grid.shape[2]), "bicubic"))
    out = np.concatenate([table[0, :special].astype(np.float32), resized.reshape(new_side * new_side, -1)])
    return out[None].astype(table.dtype)


@dataclasses.dataclass(frozen=True)
class HFEntry:
    """The HF tensors behind one jaxft parameter: one key, or one key per layer when `stacked` (scan_layers)."""

    keys: tuple[str, ...]
    kind: Kind
    stacked: bool

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each HF tensor of this entry for a jaxft parameter of `shape`."""
        return self.kind.hf_shape(tuple(shape[1:]) if self.stacked else tuple(shape))

    def to_jaxft(self, tensors: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """HF tensors (in `keys` order) -> the jaxft parameter; stacked entries stack the layers on axis 0."""
        if not self.stacked:
            return self.kind.to_jaxft(tensors[0], tuple(shape))
        return np.stack([self.kind.to_jaxft(t, tuple(shape[1:])) for t in tensors])

    def to_jaxft_block(
        self, read: Callable[[str], np.ndarray], shape: tuple[int, ...], index: tuple[slice, ...]
    ) -> np.ndarray:
        """Only the block `index` of the jaxft parameter (a `make_array_from_callback` shard), reading only the
        layers that block covers, so a stacked parameter never exists whole on the host."""
        if not self.stacked:
            return self.kind.to_jaxft(read(self.keys[0]), tuple(shape))[index]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        layers = range(*index[0].indices(shape[0]))
        return np.stack([self.kind.to_jaxft(read(self.keys[i]), tuple(shape[1:]))[index[1:]] for i in layers])

    def to_hf(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """The jaxft parameter -> {HF key: tensor}; a stacked parameter unstacks into one tensor per layer."""
        if not self.stacked:
            return {self.keys[0]: self.kind.to_hf(array)}
        return {key: self.kind.to_hf(array[i]) for i, key in enumerate(self.keys)}


# A table row: (jaxft path regex, HF key template whose {0}, {1}.. are the regex's groups, kind).
Row = tuple[str, str, Kind]


def lookup(path: str, table: Sequence[Row], prefix: str = "") -> HFEntry | None:
    """The entry of the first row whose regex fully matches `path`, its key under `prefix`; None if no row does."""
    for pattern, template, kind in table:
        m = re.fullmatch(pattern, path)
        if m:
            return HFEntry((prefix + template.format(*m.groups()),), kind, False)
    return None


def match_entry(
    path: str,
    num_layers: int,
    global_table: Sequence[Row],
    layer_table: Sequence[Row],
    layer_prefix: str,
    prefix: str = "",
) -> HFEntry | None:
    """A decoder family's lookup: the global rows first, then `layers/[i/]...` against the per-layer rows, whose keys
    live under `prefix + layer_prefix.format(i)`: one key for layer i's parameter, or one per layer for a stacked
    (scanned, `layers/...`) parameter."""
    found = lookup(path, global_table, prefix)
    if found is not None:
        return found
    m = re.fullmatch(r"layers/(?:(\d+)/)?(.+)", path)
    if m is None:
        return None
    index, rest = m.groups()
    inner = lookup(rest, layer_table)
    if inner is None:
        return None
    layers = range(num_layers) if index is None else (int(index),)
    keys = tuple(prefix + layer_prefix.format(i) + inner.keys[0] for i in layers)
    return HFEntry(keys, inner.kind, index is None)


@dataclasses.dataclass(frozen=True)
class KeyRenames:
    """Renames from the names a family's older checkpoints use to its table's torch-style keys.

    `suffixes`: safetensors key endings (old TF-converted BERT checkpoints call LayerNorm parameters gamma/beta).
    `flax_leaves`: legacy HF Flax msgpack leaf names -> (torch name, transposed), applied to the last path part.
    """

    suffixes: tuple[tuple[str, str], ...] = ()
    flax_leaves: tuple[tuple[str, str, bool], ...] = ()

    def key(self, key: str) -> str:
        for old, new in self.suffixes:
            if key.endswith(old):
                return key[: -len(old)] + new
        return key

    def flax_leaf(self, parts: list[str], leaf: np.ndarray) -> tuple[str, np.ndarray]:
        """The torch-style key and tensor of one msgpack leaf at `parts`."""
        for old, new, transposed in self.flax_leaves:
            if parts[-1] == old:
                if transposed and leaf.ndim == 4:  # a Flax conv kernel [kh, kw, in, out] -> torch [out, in, kh, kw]
                    return ".".join(parts[:-1] + [new]), np.ascontiguousarray(leaf.transpose(3, 2, 0, 1))
                return ".".join(parts[:-1] + [new]), np.ascontiguousarray(leaf.T) if transposed else leaf
        return ".".join(parts), leaf


# jaxft task -> the ending of its transformers class name (BertForSequenceClassification, LlamaForCausalLM).
TASK_CLASS_SUFFIXES = {
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "causal-lm": "ForCausalLM",
    "image-classification": "ForImageClassification",
}

# HF's Flax models name Dense kernels [in, out], LayerNorm scales and embedding tables differently from torch.
HF_FLAX_LEAVES = (("kernel", "weight", True), ("scale", "weight", False), ("embedding", "weight", False))
