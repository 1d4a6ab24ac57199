"""Orbax checkpoints of a run: save (async, atomic), retention, and restore straight into target shardings.

Each checkpoint holds the train state, the data iterator state and run metadata (config, freeze plan,
pretrained source, label names). Resume policy belongs to the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxft.config import CheckpointConfig
from jaxft.state import TrainState


class RunCheckpointError(ValueError):
    """A run dir without a usable checkpoint; names the path."""


def build_manager(run_dir: Path, cfg: CheckpointConfig, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # half-written saves of a killed run are removed
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


def _to_tree(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "rng": state.rng,
        "trainable": state.trainable.to_pure_dict(),
        "frozen": state.frozen.to_pure_dict(),
        "opt_state": state.opt_state,
    }


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_state: dict[str, Any],
    meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts an async save of step `state.step`; the loop keeps stepping while the host writes."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_tree(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
    )


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_checkpoint(
    manager: ocp.CheckpointManager, abstract_state: TrainState, shardings: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """Restores into the target shardings (each process reads only its shards)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise RunCheckpointError(f"{manager.directory}: no checkpoint to restore")
    target = abstract_with_shardings(_to_tree(abstract_state), _to_tree(shardings))
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        ),
    )
    tree = out["state"]
    trainable = _replace_pure(abstract_state.trainable, tree["trainable"])
    frozen = _replace_pure(abstract_state.frozen, tree["frozen"])
    state = TrainState(
        step=tree["step"], trainable=trainable, frozen=frozen, opt_state=tree["opt_state"], rng=tree["rng"]
    )
    return state, out["data"], out["meta"]


def restore_params(
    run_dir: Path, abstract_params: nnx.State, shardings: nnx.State, step: int | None = None
) -> tuple[nnx.State, dict[str, Any], int]:
    """Only the parameters (trainable ∪ frozen) of a run, for predict/eval/export; no optimizer state read."""
    manager = build_manager(run_dir, CheckpointConfig(), read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise RunCheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint in this run dir")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    trainable_paths = set(meta["trainable_paths"])
    parts = {"trainable": {}, "frozen": {}}
    for (path, var), (_, sh) in zip(abstract_params.flat_state(), shardings.flat_state()):
        key = "trainable" if "/".join(map(str, path)) in trainable_paths else "frozen"
        parts[key][path] = var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh.get_value()))
    target = {k: nnx.from_flat_state(v).to_pure_dict() for k, v in parts.items()}
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, partial_restore=True))
    )["state"]
    merged = nnx.merge_state(
        _replace_pure(nnx.from_flat_state(parts["trainable"]), restored["trainable"]),
        _replace_pure(nnx.from_flat_state(parts["frozen"]), restored["frozen"]),
    )
    manager.close()
    return merged, meta, step


def _replace_pure(state: nnx.State, pure: dict) -> nnx.State:
    out = jax.tree.map(lambda x: x, state)  # a copy: replace_by_pure_dict mutates in place
    out.replace_by_pure_dict(pure)
    return out
