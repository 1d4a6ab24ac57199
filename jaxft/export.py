"""Export of a run's checkpoint as a standard Hugging Face folder: config, safetensors and tokenizer files for
BERT-family classifiers and decoder LMs (LoRA adapters folded in with `merged`), or a PEFT LoRA adapter folder.

Streams one HF tensor at a time from the devices into the files (a scanned model's stacked weights one layer at
a time); it must never hold the whole model on the host, and never leaves a half-written folder behind.
"""

from __future__ import annotations

import dataclasses
import functools
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
from flax import nnx

from jaxft.checkpoint import RunCheckpointError
from jaxft.config import from_dict
from jaxft.data.images import EvalTransform
from jaxft.load import CheckpointError
from jaxft.models import Family, family_for_spec, lora
from jaxft.models.hf_layout import Kind
from jaxft.paths import path_str
from jaxft.run_dir import read_run, restore_run
from jaxft.safetensors_out import write_weights

log = logging.getLogger("jaxft.export")

# HF's own size strings are decimal ("2GB" = 2e9 bytes); shards of at most this many bytes unless one tensor is bigger.
DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# Everything an encoder's or a decoder's tokenizer may need; whichever of these the pretrained folder has is copied.
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
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # an image model's processor, as AutoImageProcessor reads it
# A decoder's sampling defaults (eos ids, temperature) travel with the model, not with an adapter.
GENERATION_FILES = ("generation_config.json",)

# PEFT's file names, and the prefix of its saved keys (PeftModel.base_model.model is the transformers model).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model"
PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class Fold:
    """A LoRA adapter folded into the kernel it sits on: W + scale·A·B."""

    a: str  # the lora_a parameter path
    b: str  # the lora_b parameter path
    scale: float  # alpha / rank


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of the exported file: its HF key, the jaxft parameter it comes from, and its layout."""

    key: str
    path: str
    kind: Kind  # how the parameter (or one layer of it) is laid out as this tensor
    shape: tuple[int, ...]
    dtype: np.dtype
    layer: int | None = None  # its index on the stacked `layers` axis of a scanned parameter
    fold: Fold | None = None  # an adapter to fold into this kernel (merged export)

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
    merged: bool = False,
    adapter: bool = False,
) -> Path:
    """Writes step `step` (default: the latest complete) of a run as an HF model folder at `out_dir`. A LoRA run
    needs `merged` (every adapter folded into its base weight) or `adapter` (a PEFT adapter folder for the run's
    pretrained model); `dtype` applies to the adapter tensors too.

    Every process joins the gathers; process 0 alone writes, into a temporary sibling that is renamed into
    place only when complete. Files bigger than `max_shard_bytes` are split into HF's sharded layout.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"{out_dir}: unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if max_shard_bytes <= 0:
        raise ExportError(f"{out_dir}: max_shard_bytes must be positive, got {max_shard_bytes}")
    if merged and adapter:
        raise ExportError(f"{out_dir}: --merged and --adapter exclude each other (a whole model or an adapter)")
    if not (run_dir / "run.json").is_file():
        raise ExportError(f"{run_dir}: not a jaxft run dir (no run.json)")
    _on_process0(lambda: check_out_dir(out_dir))
    try:
        check_lora_mode(run_dir, read_run(run_dir), merged, adapter)
        run = restore_run(run_dir, step)
    except (RunCheckpointError, CheckpointError) as e:  # CheckpointError: an adapter run's base files changed
        raise ExportError(str(e)) from e
    params, meta, spec, step = run.params, run.meta, run.spec, run.step
    model_type = meta["hf_config"].get("model_type", "")
    source = Path(meta["source"]["path"])
    if adapter:
        tensors, modules, fan_in_fan_out = plan_adapter_tensors(params, spec, model_type, DTYPES[dtype], run_dir)
        config = make_adapter_config(meta, modules, fan_in_fan_out)
        # PEFT reads a single adapter_model.safetensors, so an adapter is never sharded.
        layout = dict(config_name=ADAPTER_CONFIG, weights_stem=ADAPTER_WEIGHTS, copied=TOKENIZER_FILES)
        max_shard_bytes = sys.maxsize
    else:
        scale = lora_scale(meta) if merged else None
        tensors = plan_tensors(params, spec, model_type, DTYPES[dtype], run_dir, fold_scale=scale)
        config = make_hf_config(meta, spec, dtype)
        decoder = family_for_spec(spec).is_decoder
        layout = dict(copied=TOKENIZER_FILES + (GENERATION_FILES if decoder else ()))
        if "images" in meta:  # an image classifier: its eval transform, for AutoImageProcessor, and no tokenizer
            transform = EvalTransform.from_record(meta["images"])
            layout = dict(copied=(), written={PREPROCESSOR_CONFIG: transform.preprocessor_config()})
    arrays = iter_hf_arrays(params, tensors)
    _on_process0(
        lambda: write_folder(out_dir, tensors, arrays, config, source, max_shard_bytes, **layout), drain=arrays
    )
    log.info("exported step %d of %s to %s", step, run_dir, out_dir)
    return out_dir


def check_lora_mode(run_dir: Path, meta: dict[str, Any], merged: bool, adapter: bool) -> None:
    """A LoRA run exports merged or as an adapter, a run without adapters as neither; an adapter folder carries
    the adapters only, so a run that also trained base weights must be merged."""
    rank = (meta["config"].get("lora") or {}).get("rank", 0)
    if rank and not (merged or adapter):
        raise ExportError(
            f"{run_dir}: the run has LoRA adapters (rank {rank}); pass --merged to fold them into the base "
            "weights or --adapter to write a PEFT adapter folder"
        )
    if not rank and (merged or adapter):
        flag = "--merged" if merged else "--adapter"
        raise ExportError(f"{run_dir}: {flag} exports LoRA adapters, and this run has none (lora.rank=0)")
    if adapter:
        trained = [p for p in meta.get("trainable_paths", ()) if not lora.is_adapter(p)]
        if trained:
            shown = ", ".join(trained[:4]) + (f" (+{len(trained) - 4} more)" if len(trained) > 4 else "")
            raise ExportError(
                f"{run_dir}: --adapter writes the LoRA adapters only, but the run also trained {shown}; "
                "export it with --merged"
            )


def lora_scale(meta: dict[str, Any]) -> float:
    """alpha / rank, the factor the adapters' product is added with."""
    cfg = from_dict(meta["config"]).lora
    return cfg.alpha / cfg.rank


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


def plan_tensors(
    params: Any, spec: Any, model_type: str, dtype: np.dtype, run_dir: Path, fold_scale: float | None = None
) -> list[HFTensor]:
    """The HF tensors to write, in parameter order (a stacked parameter's layers in turn); every key the HF class
    holds must be among them. With `fold_scale`, each LoRA adapter is folded into its kernel (W + scale·A·B)."""
    family = family_for_spec(spec)
    prefix = export_prefix(family, model_type, run_dir)
    flat = {path_str(p): var for p, var in nnx.to_flat_state(params)}
    adapted = {lora.adapted_kernel(p) for p in flat if lora.is_adapter(p)}
    tensors, problems = [], []
    for path, var in flat.items():
        if lora.is_adapter(path) and fold_scale is not None:
            continue  # folded into its kernel
        entry = family.hf_entry(path, spec, prefix)
        if entry is None:
            problems.append(f"{path} has no HF key")
            continue
        fold = None
        if fold_scale is not None and path in adapted:
            a, b = lora.adapter_paths(path)
            fold = Fold(a, b, fold_scale)
        src = np.dtype(var.get_value().dtype)
        out = dtype if jnp.issubdtype(src, jnp.floating) else src  # only float tensors take --dtype
        shape = entry.hf_shape(tuple(var.shape))
        layers = range(len(entry.keys)) if entry.stacked else (None,)
        tensors += [HFTensor(key, path, entry.kind, shape, out, i, fold) for key, i in zip(entry.keys, layers)]
    have = {t.key for t in tensors}
    needed = family.hf_state_keys(spec, prefix)
    problems += [f"the HF class needs {k}, which the run has no parameter for" for k in sorted(needed - have)]
    problems += [f"{k} is not a tensor of the HF class" for k in sorted(have - needed)]
    if problems:
        raise ExportError(
            f"{run_dir}: cannot export as {family.hf_class_name(spec, model_type)}: " + "; ".join(problems)
        )
    return tensors


def plan_adapter_tensors(
    params: Any, spec: Any, model_type: str, dtype: np.dtype, run_dir: Path
) -> tuple[list[HFTensor], list[str], bool]:
    """PEFT's tensors for every LoRA adapter, under the HF module its kernel maps to: lora_A.weight [r, in] and
    lora_B.weight [out, r]. Also the adapted HF module names, and whether they are Conv1D (PEFT's fan_in_fan_out).

    PEFT's lora_A / lora_B are torch Linear layers on Linear and Conv1D alike, and a kernel's in... and out...
    dims flatten in C order into the HF weight's in and out, so A [in..., r] and B [r, out...] take the kernel
    kinds' own flattening (GPT-2's fused B [r, 3, N, H] becomes c_attn's [3*N*H] outputs, q then k then v).
    """
    family = family_for_spec(spec)
    prefix = export_prefix(family, model_type, run_dir)
    tensors, modules, layer_types, problems = [], [], set(), []
    for p, var in nnx.to_flat_state(params):
        path = path_str(p)
        if not lora.is_adapter(path):
            continue
        is_a = path == lora.adapter_paths(lora.adapted_kernel(path))[0]
        entry = family.hf_entry(lora.adapted_kernel(path), spec, prefix)
        if entry is None or not entry.kind.is_matrix:
            problems.append(f"{path} sits on no HF linear layer")
            continue
        shape = tuple(var.shape)[1:] if entry.stacked else tuple(var.shape)
        # A has the kernel's in... dims and r; B has r (one input dim) and the kernel's out... dims.
        kind = Kind.LINEAR2 if is_a and len(shape) == 3 else Kind.LINEAR1
        layers = range(len(entry.keys)) if entry.stacked else (None,)
        for key, i in zip(entry.keys, layers):
            hf_module = key.removesuffix(".weight")
            part = "lora_A" if is_a else "lora_B"
            tensors.append(
                HFTensor(f"{PEFT_PREFIX}{hf_module}.{part}.weight", path, kind, kind.hf_shape(shape), dtype, i)
            )
            modules += [hf_module] if is_a else []
        layer_types.add(entry.kind.layer_type)
    if len(layer_types) > 1:
        problems.append("adapters on both Linear and Conv1D layers (PEFT's fan_in_fan_out is one setting)")
    if problems or not tensors:
        raise ExportError(f"{run_dir}: cannot export a PEFT adapter: " + ("; ".join(problems) or "no LoRA adapters"))
    return tensors, sorted(modules), layer_types == {"conv"}


def export_prefix(family: Family, model_type: str, run_dir: Path) -> str:
    """The prefix of the body's keys in the transformers class the run exports to."""
    if model_type not in family.model_types:
        raise ExportError(f"{run_dir}: model_type {model_type!r} has no transformers class to export to")
    return family.export_prefix(model_type)


def make_hf_config(meta: dict[str, Any], spec: Any, dtype: str) -> dict[str, Any]:
    """The pretrained config.json with this run's task class and dtype (and a classifier's labels)."""
    config = dict(meta["hf_config"])
    family = family_for_spec(spec)
    config.update(
        architectures=[family.hf_class_name(spec, config["model_type"])],
        dtype=dtype,
        torch_dtype=dtype,  # what transformers v4 reads; v5 reads `dtype`
    )
    if family.is_decoder:
        return config
    labels = list(meta.get("label_names") or [f"LABEL_{i}" for i in range(spec.num_labels)])
    if len(labels) != spec.num_labels:
        raise ExportError(f"run.json: {len(labels)} label names for a head of {spec.num_labels} labels")
    config.pop("problem_type", None)  # the pretrained head's, not this run's
    config.update(
        num_labels=len(labels),
        id2label={str(i): name for i, name in enumerate(labels)},
        label2id={name: i for i, name in enumerate(labels)},
    )
    if family.task_of(spec) == "sequence-classification":
        config["problem_type"] = "single_label_classification"  # jaxft trains a softmax head
    return config


def make_adapter_config(meta: dict[str, Any], modules: list[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json: a LoRA for causal LM on exactly the adapted modules, named by their full
    module paths in the transformers class so no other layer with the same short name matches."""
    cfg = from_dict(meta["config"]).lora
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name(meta),
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def base_model_name(meta: dict[str, Any]) -> str:
    """The hub id the run's model came from, or the absolute path of its local pretrained folder."""
    source, folder = meta["config"]["model"]["source"], meta["source"]["path"]
    return str(Path(folder).resolve()) if str(Path(source).expanduser()) == folder else source


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
    values = {path_str(p): var.get_value() for p, var in nnx.to_flat_state(params)}
    for t in tensors:
        host = t.kind.to_hf(gather(device_tensor(values, t)))
        yield t.key, host.astype(t.dtype, copy=False)
        del host  # before the next gather


def device_tensor(values: dict[str, jax.Array], t: HFTensor) -> jax.Array:
    """The device array behind one HF tensor: a parameter, one layer of a stacked parameter (sliced on the devices,
    so the host never sees the whole stack), or a kernel with its adapter folded in."""
    pick = (lambda x: x) if t.layer is None else (lambda x: _take_layer(x, t.layer))
    x = pick(values[t.path])
    if t.fold is not None:
        x = _fold_adapter(x, pick(values[t.fold.a]), pick(values[t.fold.b]), t.fold.scale)
    return x


@jax.jit
def _take_layer(stacked: jax.Array, i: jax.Array) -> jax.Array:
    return stacked[i]  # `i` traced: one compilation per parameter shape, not per layer


@functools.partial(jax.jit, static_argnums=3)
def _fold_adapter(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    # In fp32 whatever the stored dtypes (a frozen base may be bf16); the export's dtype is applied on the host.
    return lora.merged_kernel(kernel.astype(jnp.float32), a, b, scale, a.ndim - 1)


def write_folder(
    out_dir: Path,
    tensors: list[HFTensor],
    arrays: Iterator[tuple[str, np.ndarray]],
    config: dict[str, Any],
    source: Path,
    max_shard_bytes: int,
    *,
    config_name: str = "config.json",
    weights_stem: str = "model",
    copied: tuple[str, ...] = TOKENIZER_FILES,
    written: dict[str, Any] | None = None,
) -> None:
    """Builds the folder in a temporary sibling and renames it into place; a failure removes the sibling.
    `copied` names the pretrained folder's files that go along (whichever of them exist); `written` maps more
    file names to the JSON they hold."""
    if copied and not source.is_dir():
        raise ExportError(f"{source}: the run's pretrained folder is gone; its tokenizer files are needed")
    check_out_dir(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # not mkdtemp: that one is private (0700), and this folder becomes the export
        write_weights(tmp, tensors, arrays, max_shard_bytes, weights_stem)
        (tmp / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, content in (written or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        present = [n for n in copied if (source / n).is_file()]
        for name in present:
            shutil.copyfile(source / name, tmp / name)
        if copied and not any(n in TOKENIZER_FILES for n in present):
            log.warning("%s: no tokenizer files to copy; the export has weights and config only", source)
        os.replace(tmp, out_dir)  # replaces only a missing or empty folder, so nothing is ever overwritten
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExportError(f"{out_dir}: export failed, nothing written ({type(e).__name__}: {e})") from e
        raise
