"""A run directory: its metadata (run.json, written once per start), the scan for the checkpoint a run resumes from,
and the restore of a run's model that eval, predict, export and generate share.

It decides nothing about training; the state a resume fills comes from setup.abstract_state through `restore`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxft import checkpoint, models, setup
from jaxft import mesh as mesh_lib
from jaxft.config import Config, ConfigError, ModelConfig, config_changes, from_dict, to_json
from jaxft.freeze import FreezePlan
from jaxft.sharding import shardings_like
from jaxft.state import TrainState

log = logging.getLogger("jaxft.run_dir")

# ---------------------------------------------------------------------------------------------- metadata


def run_metadata(
    cfg: Config,
    plan: FreezePlan,
    skeleton: setup.ModelSkeleton,
    label_names: tuple[str, ...],
    trainable_paths: set[str] | frozenset[str],
    prompt_kind: str = "",
) -> dict[str, Any]:
    """What a run dir needs to be understood without its config file: predict, eval, export and generate read it.
    `prompt_kind` (causal LMs): how `jaxft generate` renders prompts, "chat" or "text"."""
    meta = {
        "config": to_json(cfg),
        "freeze_plan": plan.to_json(),
        "trainable_paths": sorted(trainable_paths),
        "source": skeleton.source,
        "label_names": list(label_names),
        "hf_config": skeleton.hf_config,
        "family": skeleton.family.name,
        "spec": dataclasses.asdict(skeleton.spec),
    }
    return {**meta, "prompt_kind": prompt_kind} if prompt_kind else meta


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` to `path` atomically (a temporary sibling renamed over it), from process 0 only."""
    if jax.process_index() != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run dir, checked; RunCheckpointError names what is wrong."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise checkpoint.RunCheckpointError(f"{run_dir}: not a jaxft run dir (no run.json)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise checkpoint.RunCheckpointError(f"{path}: corrupted run metadata ({e})") from None
    checkpoint.check_metadata(path, meta, "run metadata", checkpoint.RunCheckpointError)
    return meta


# ------------------------------------------------------------------------------------------------ resume


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    step: int
    state: TrainState
    trainable_paths: frozenset[str]  # the freeze phase the checkpoint was saved in
    data: dict[str, Any]  # every process's iterator state, and loop counters


# (step, that checkpoint's metadata) -> the state restored into the abstract state of its freeze phase
Restore = Callable[[int, dict[str, Any]], TrainState]


def check_config_change(path: Path, saved: dict[str, Any], cfg: Config, allow: bool, mesh: Mesh | None = None) -> None:
    """A resume with a config that changes the result is an error, unless `allow` (--allow-config-change).
    On `mesh`, a model.compute_dtype that resolves to the same dtype ("auto" against a run saved with the dtype
    it means there, e.g. "float32" on a CPU) is no change."""
    changes = [
        (k, old, new)
        for k, old, new in config_changes(saved, cfg)
        if not (k == "model.compute_dtype" and mesh is not None and _same_compute_dtype(old, new, mesh))
    ]
    if not changes:
        return
    listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changes)
    if not allow:
        raise ConfigError(
            f"{path}: config differs from the checkpoint's in keys that change the result: {listed}; "
            "pass --allow-config-change to resume anyway"
        )
    log.warning("resuming with a changed config (--allow-config-change): %s", listed)


def _same_compute_dtype(old: str, new: str, mesh: Mesh) -> bool:
    return setup.compute_dtype(ModelConfig(compute_dtype=old), mesh) == setup.compute_dtype(
        ModelConfig(compute_dtype=new), mesh
    )


def find_resume_point(
    run_dir: Path, cfg: Config, skeleton: setup.ModelSkeleton, restore: Restore, allow_change: bool
) -> ResumePoint | None:
    """The newest checkpoint that restores; damaged ones (unfinished, truncated, unreadable) are skipped
    with a warning and moved aside. A checkpoint of another model, or a config that changes the math, is an error."""
    problems, damaged = [], []
    checkpoint.quarantine_unreadable_metrics(run_dir)
    for step in checkpoint.all_steps(run_dir):
        path = checkpoint.checkpoint_dir(run_dir) / str(step)
        try:
            meta = checkpoint.read_meta(run_dir, step)
            data = checkpoint.read_data_state(run_dir, step)
            checkpoint.check_same_model(path, meta.get("family", "bert"), meta["spec"], skeleton.spec)
            check_config_change(path, meta["config"], cfg, allow_change, skeleton.mesh)
            state = restore(step, meta)
        except checkpoint.CorruptCheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            problems.append(str(e))
            damaged.append(step)
            continue
        _report_resume(run_dir, skeleton, meta, data, damaged)
        log.info("resuming from %s", path)
        return ResumePoint(step, state, frozenset(meta["trainable_paths"]), data)
    if problems:
        raise checkpoint.RunCheckpointError(
            f"{checkpoint.checkpoint_dir(run_dir)}: no usable checkpoint ({'; '.join(problems)})"
        )
    return None


def _report_resume(
    run_dir: Path, skeleton: setup.ModelSkeleton, meta: dict[str, Any], data: dict[str, Any], damaged: list[int]
) -> None:
    """Warnings about the resume point, and damaged newer checkpoints moved aside (the replayed steps save them
    again)."""
    if meta.get("source", {}).get("files") != skeleton.source.get("files"):
        log.warning("the pretrained files at %s changed since this run started", skeleton.folder)
    if len(data.get("process_states", [])) > 1:
        log.warning(
            "this checkpoint was saved by an older jaxft on %d processes, whose data order depended on the "
            "process count; the data order from here on differs from the uninterrupted run's",
            len(data["process_states"]),
        )
    for bad in damaged:
        if jax.process_index() == 0:
            log.warning("moved damaged checkpoint %d to %s", bad, checkpoint.move_aside(run_dir, bad))
    if damaged and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxft: damaged checkpoints moved")


def data_iterator_state(data: dict[str, Any]) -> dict[str, Any]:
    """The train data's iterator state in a checkpoint: one global position, the same on every process (a run
    saved by an older jaxft kept one per process: the first is taken)."""
    return data["iterator"] if "iterator" in data else data["process_states"][0]


# ----------------------------------------------------------------------------------------------- restore


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run's model at one of its checkpoints, restored into this host's devices."""

    graphdef: nnx.GraphDef  # default execution options (fp32 compute, no remat)
    params: nnx.State  # trainable and frozen parameters together
    meta: dict[str, Any]  # run.json
    mesh: Mesh
    step: int
    spec: Any  # the family's spec


def restore_mesh(cfg: Config) -> Mesh:
    """The run's mesh, or data-parallel over this host's devices when it was trained on another device count."""
    try:
        return mesh_lib.build_mesh(cfg.mesh)
    except mesh_lib.MeshError:
        return mesh_lib.build_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))


def restore_run(run_dir: Path, step: int | None = None) -> RestoredRun:
    """The parameters of `step` (default: the latest complete checkpoint) of a finished or running run; no optimizer
    state is read. A checkpoint saved without its frozen parameters gets them from the recorded pretrained files."""
    meta = read_run(Path(run_dir))
    cfg = from_dict(meta["config"])
    mesh = restore_mesh(cfg)
    spec = models.spec_from_dict(meta.get("family", "bert"), meta["spec"])
    folder, hf = Path(meta["source"].get("path", "")), meta.get("hf_config") or {}
    skeleton = setup.skeleton_of(spec, cfg, mesh, folder, hf, meta["source"])
    frozen = set(skeleton.param_shapes) - set(meta["trainable_paths"])
    skeleton = setup.with_frozen_dtype(skeleton, cfg.model.frozen_dtype, frozen)  # as trained and saved

    def load_frozen(abstract_frozen: nnx.State, step_meta: dict[str, Any]) -> nnx.State:
        return setup.load_frozen(skeleton, cfg.model, cfg.load, abstract_frozen, step_meta["source"])

    shardings = shardings_like(skeleton.abstract_params, skeleton.param_shardings)
    params, _, step = checkpoint.restore_params(run_dir, skeleton.abstract_params, shardings, step, spec, load_frozen)
    return RestoredRun(skeleton.graphdef, params, meta, mesh, step, spec)
