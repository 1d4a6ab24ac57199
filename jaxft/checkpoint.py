"""Orbax checkpoints of a run: async atomic saves, retention, validation, and restore straight into
target shardings.

Each checkpoint holds the train state, every process's data iterator state, and run metadata (config,
freeze plan, pretrained source, label names). What to resume from is train's decision; this module only
says which checkpoints are complete and restores them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from jaxft import models
from jaxft.config import CheckpointConfig
from jaxft.state import TrainState

log = logging.getLogger("jaxft.checkpoint")

COMMIT_MARKER = "commit_success.txt"  # written last by Orbax; a step dir without it never finished
ITEMS = ("state", "data", "meta")
# Checkpoint metadata key: False when the frozen parameters were left out (checkpoint.save_frozen=false) and
# must be read back from the pretrained files recorded in the metadata's `source`. Older checkpoints lack it.
FROZEN_SAVED = "frozen_saved"

# (abstract frozen State, the checkpoint's metadata) -> the frozen State, read from the pretrained files and placed
# in the model's shardings
LoadFrozen = Callable[[nnx.State, dict[str, Any]], nnx.State]


class RunCheckpointError(ValueError):
    """A run dir or checkpoint that cannot be used; the message names the path and the problem."""


class CorruptCheckpointError(RunCheckpointError):
    """One step's checkpoint is damaged (unfinished, truncated, unreadable); an older one may still serve."""


class CheckpointSaveError(RunCheckpointError):
    """Writing a checkpoint failed (disk full, permissions); earlier checkpoints are untouched."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir).absolute() / "checkpoints"


def best_mode(cfg: CheckpointConfig) -> str:
    if cfg.keep_best_mode != "auto":
        return cfg.keep_best_mode
    return "min" if "loss" in cfg.keep_best_metric or "perplexity" in cfg.keep_best_metric else "max"


def build_manager(run_dir: Path, cfg: CheckpointConfig, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the latest `keep` checkpoints plus the best one by `keep_best_metric`."""
    keep: list[Any] = [policies.LatestN(n=cfg.keep)]
    best: dict[str, Any] = {}
    if cfg.keep_best_metric:
        metric = cfg.keep_best_metric
        keep.append(
            policies.BestN(
                get_metric_fn=lambda m: m[metric],
                reverse=best_mode(cfg) == "min",  # BestN keeps the top of an ascending sort
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
        # best_fn makes Orbax write each checkpoint's metrics next to it, so the best survives a resume.
        best = {"best_fn": lambda m: m[metric], "best_mode": best_mode(cfg)}
    options = ocp.CheckpointManagerOptions(
        **best,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=cfg.async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # half-written saves of a killed run are removed
    )
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def _to_tree(state: TrainState, with_frozen: bool = True) -> dict[str, Any]:
    tree = {
        "step": state.step,
        "rng": state.rng,
        "trainable": nnx.to_pure_dict(state.trainable),
        "opt_state": state.opt_state,
    }
    if with_frozen:
        tree["frozen"] = nnx.to_pure_dict(state.frozen)
    return tree


# ------------------------------------------------------------------------------------------------ save


class Saver:
    """Async, atomic saves of a run's checkpoints. A failed background write is reported, with the step
    it belonged to, by the next save or by `finish`."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig):
        quarantine_unreadable_metrics(run_dir)
        self.manager = build_manager(run_dir, cfg)
        self.pending: int | None = None
        self.save_frozen = cfg.save_frozen

    def save(
        self,
        state: TrainState,
        data_state: dict[str, Any],
        meta: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts an async save of step `state.step`; the loop keeps stepping while the host writes.

        Orbax writes into a temporary directory and renames it on commit, so a crash mid-save leaves the
        earlier checkpoints as they were. Old checkpoints are removed only after the new one is committed.
        """
        step = int(jax.device_get(state.step))
        self.finish()  # Orbax would wait for the previous save here anyway
        self.pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_tree(state, self.save_frozen)),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave({**meta, FROZEN_SAVED: self.save_frozen}),
                ),
                metrics=metrics,
            )
        except Exception as e:
            raise self._error(e) from None

    def finish(self) -> None:
        """Blocks until the pending save is committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._error(e) from None
        self.pending = None

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as e:  # a failed write was already reported, or is being raised
            log.debug("checkpoint manager close: %s", e)

    def _error(self, e: Exception) -> CheckpointSaveError:
        good = [s for s in complete_steps(self.manager.directory.parent) if s != self.pending]
        last = f"the last good checkpoint is step {good[0]}" if good else "no earlier checkpoint exists"
        return CheckpointSaveError(
            f"{self.manager.directory}: saving step {self.pending} failed ({_root_cause(e)}); {last}"
        )


def quarantine_unreadable_metrics(run_dir: Path) -> None:
    """Orbax reads every step's saved metrics when it opens a run; one unreadable file would stop every
    command, so that checkpoint is moved aside (kept, never deleted) with a warning."""
    if jax.process_index() != 0:
        return
    for step in all_steps(run_dir):
        path = checkpoint_dir(run_dir) / str(step) / "metrics" / "metrics"
        if path.exists() and _step_metrics(run_dir, step) is None:
            log.warning("%s: unreadable checkpoint metrics; moved checkpoint to %s", path, move_aside(run_dir, step))


_OS_REASON = re.compile(
    r"No space left on device|File too large|Permission denied|Read-only file system|Disk quota exceeded"
    r"|Input/output error|\[Errno \d+\][^\]\n\"]*"
)


def _root_cause(e: BaseException) -> str:
    """One short line for an exception chain; the OS-level reason first when one is buried in it
    (tensorstore wraps ENOSPC/EFBIG/EACCES in long messages)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in chain:
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = " ".join(str(exc) for exc in chain)
    reason = _OS_REASON.search(text)
    first = (str(chain[0]).splitlines() or [""])[0]
    if reason:
        return reason.group(0).strip()
    return f"{type(chain[0]).__name__}: {first}"[:300]


# --------------------------------------------------------------------------------------- inspection


def all_steps(run_dir: Path) -> list[int]:
    """Every step directory, newest first, finished or not."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((int(p.name) for p in d.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)), reverse=True)


def complete_steps(run_dir: Path) -> list[int]:
    """Steps whose save committed (the commit marker is written last), newest first."""
    d = checkpoint_dir(run_dir)
    return [s for s in all_steps(run_dir) if (d / str(s) / COMMIT_MARKER).is_file()]


def check_step_complete(run_dir: Path, step: int) -> Path:
    path = checkpoint_dir(run_dir) / str(step)
    if not path.is_dir():
        have = ", ".join(map(str, all_steps(run_dir))) or "none"
        raise RunCheckpointError(f"{path}: no checkpoint for step {step} (saved steps: {have})")
    for sub in ("", *ITEMS):
        if not (path / sub / COMMIT_MARKER).is_file():
            raise CorruptCheckpointError(f"{path / sub}: missing commit marker; the save never finished")
    return path


def read_meta(run_dir: Path, step: int) -> dict[str, Any]:
    """The run metadata stored with one checkpoint; a damaged file is a CorruptCheckpointError."""
    path = check_step_complete(run_dir, step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: corrupted checkpoint metadata ({_root_cause(e)})") from None
    check_metadata(path, meta, "checkpoint metadata", CorruptCheckpointError)
    return meta


# What every run's metadata holds (run.json, and a copy with each checkpoint), by the JSON type of each value.
METADATA_FIELDS = {"config": dict, "spec": dict, "source": dict, "trainable_paths": list, "label_names": list}


def check_metadata(path: Path, meta: Any, what: str, error: type[RunCheckpointError]) -> None:
    """Raises `error` naming every field of a run's metadata that is missing or of the wrong type."""
    bad = [k for k, kind in METADATA_FIELDS.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if bad:
        raise error(f"{path}: corrupted {what} ({', '.join(bad)} missing or malformed)")


def read_data_state(run_dir: Path, step: int) -> dict[str, Any]:
    path = checkpoint_dir(run_dir) / str(step) / "data" / "metadata"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: corrupted data iterator state ({_root_cause(e)})") from None
    # "iterator": the one, global data position; "process_states": one per process (runs saved before it)
    if not isinstance(data, dict) or not (
        isinstance(data.get("iterator"), dict) or isinstance(data.get("process_states"), list)
    ):
        raise CorruptCheckpointError(f"{path}: corrupted data iterator state (no iterator state)")
    return data


def check_same_model(path: Path, saved_family: str, saved_spec: dict[str, Any], spec: Any) -> None:
    """The checkpoint must be of this model: the same family and architecture (a new head or dropout is the
    same model), and the same parameter layout (scanned or per-layer decoder layers)."""
    diffs = models.architecture_differences(saved_family, saved_spec, spec)
    if diffs:
        raise RunCheckpointError(f"{path}: checkpoint is from another model ({'; '.join(diffs)})")
    # Decoder specs say whether the layers are stacked (scanned) or one tensor each; encoders have one layout.
    scanned = dataclasses.asdict(spec).get("scan_layers")
    if scanned is not None and saved_spec.get("scan_layers", scanned) != scanned:
        layout = {True: "scanned (model.scan_layers=true)", False: "per-layer (model.scan_layers=false)"}
        raise RunCheckpointError(
            f"{path}: checkpoint layout is {layout[saved_spec['scan_layers']]} but the config asks for "
            f"{layout[scanned]}"
        )


def select_step(run_dir: Path, step: int | None = None, best: bool = False) -> int:
    """The step a read-only command (predict, eval, export) uses: given, best, or the latest complete."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise RunCheckpointError(f"{run_dir}: not a jaxft run dir (no run.json)")
    if step is not None:
        check_step_complete(run_dir, step)
        return step
    steps = complete_steps(run_dir)
    if not steps:
        raise RunCheckpointError(f"{checkpoint_dir(run_dir)}: no complete checkpoint in this run dir")
    if not best:
        return steps[0]
    cfg = _run_checkpoint_config(run_dir)
    if not cfg.keep_best_metric:
        raise RunCheckpointError(f"{run_dir}: --best needs checkpoint.keep_best_metric, which this run left empty")
    scored = [
        (s, m[cfg.keep_best_metric]) for s in steps if (m := _step_metrics(run_dir, s)) and cfg.keep_best_metric in m
    ]
    if not scored:
        raise RunCheckpointError(f"{run_dir}: no checkpoint has {cfg.keep_best_metric!r} (was eval run at a save?)")
    pick = min if best_mode(cfg) == "min" else max
    return pick(scored, key=lambda sv: sv[1])[0]


def _run_checkpoint_config(run_dir: Path) -> CheckpointConfig:
    try:
        section = json.loads((Path(run_dir) / "run.json").read_text())["config"]["checkpoint"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise RunCheckpointError(f"{run_dir}: not a jaxft run dir (no readable run.json)") from None
    known = {k: v for k, v in section.items() if k in CheckpointConfig.__dataclass_fields__}
    return CheckpointConfig(**known)


def _step_metrics(run_dir: Path, step: int) -> dict[str, float] | None:
    path = checkpoint_dir(run_dir) / str(step) / "metrics" / "metrics"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) else None


# ---------------------------------------------------------------------------------------------- restore


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_tree(run_dir: Path, step: int, target: dict[str, Any]) -> None:
    """The saved parameter tree must equal the target's: one error lists every missing, extra or
    mis-shaped path (a checkpoint of another head size, or of a different parameter layout)."""
    path = checkpoint_dir(run_dir) / str(step) / "state"
    try:
        item = ocp.PyTreeCheckpointer().metadata(path).item_metadata
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: unreadable array metadata ({_root_cause(e)})") from None
    saved_meta = getattr(item, "tree", None)
    if not isinstance(saved_meta, dict):
        raise CorruptCheckpointError(f"{path}: unreadable array metadata (no parameter tree found)")
    parts = [k for k in ("trainable", "frozen") if k in target]
    saved = _flat_shapes({k: saved_meta.get(k, {}) for k in parts})
    wanted = _flat_shapes({k: target[k] for k in parts})
    problems = [f"missing {p} {wanted[p]}" for p in wanted if p not in saved]
    problems += [f"unexpected {p} {saved[p]}" for p in saved if p not in wanted]
    problems += [f"{p}: expected {wanted[p]}, found {saved[p]}" for p in wanted if p in saved and saved[p] != wanted[p]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RunCheckpointError(f"{path}: checkpoint has a different parameter tree ({shown})")


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    out = {}
    for keypath, leaf in flat:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keypath)
        out[name] = tuple(getattr(leaf, "shape", ()) or ())
    return out


def restore_checkpoint(
    run_dir: Path,
    abstract_state: TrainState,
    shardings: TrainState,
    step: int,
    load_frozen: LoadFrozen | None = None,
) -> TrainState:
    """Restores the train state of `step` into the target shardings: each process reads only its shards,
    so a checkpoint saved on one mesh restores onto another without a full host copy. A checkpoint saved
    without its frozen parameters gets them from `load_frozen` (the pretrained files)."""
    meta = read_meta(run_dir, step)
    with_frozen = bool(meta.get(FROZEN_SAVED, True))
    target = abstract_with_shardings(_to_tree(abstract_state, with_frozen), _to_tree(shardings, with_frozen))
    check_tree(run_dir, step, target)
    path = checkpoint_dir(run_dir) / str(step) / "state"
    try:
        tree = ocp.StandardCheckpointer().restore(path, target)
    except Exception as e:  # tensorstore reports truncated or missing chunks in its own error types
        raise CorruptCheckpointError(f"{path}: unreadable array data ({_root_cause(e)})") from None
    if with_frozen:
        frozen = _replace_pure(abstract_state.frozen, tree["frozen"])
    else:
        frozen = _frozen_from_source(path, abstract_state.frozen, meta, load_frozen)
    return TrainState(
        step=tree["step"],
        trainable=_replace_pure(abstract_state.trainable, tree["trainable"]),
        frozen=frozen,
        opt_state=tree["opt_state"],
        rng=tree["rng"],
    )


def _frozen_from_source(
    path: Path, abstract_frozen: nnx.State, meta: dict[str, Any], load_frozen: LoadFrozen | None
) -> nnx.State:
    """The frozen parameters of a checkpoint that left them out (checkpoint.save_frozen=false)."""
    if not jax.tree.leaves(abstract_frozen):
        return abstract_frozen
    if load_frozen is None:
        raise RunCheckpointError(f"{path}: checkpoint holds no frozen parameters and nothing can reload them")
    log.info("reading the frozen parameters from %s (not saved in %s)", meta.get("source", {}).get("path"), path)
    return load_frozen(abstract_frozen, meta)


def move_aside(run_dir: Path, step: int) -> Path:
    """Moves a damaged step dir out of the checkpoints (kept for inspection, never deleted), so a resumed
    run can save that step again."""
    src = checkpoint_dir(run_dir) / str(step)
    dest_root = Path(run_dir).absolute() / "damaged_checkpoints"
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / str(step), 1
    while dest.exists():
        dest, n = dest_root / f"{step}.{n}", n + 1
    src.rename(dest)
    return dest


def restore_params(
    run_dir: Path,
    abstract_params: nnx.State,
    shardings: nnx.State,
    step: int | None = None,
    spec: Any = None,
    load_frozen: LoadFrozen | None = None,
) -> tuple[nnx.State, dict[str, Any], int]:
    """Only the parameters (trainable ∪ frozen) of a run, for predict/eval/export; no optimizer state read.
    Frozen parameters left out of the checkpoint come from `load_frozen`."""
    step = select_step(run_dir, step)
    meta = read_meta(run_dir, step)
    if spec is not None:
        check_same_model(checkpoint_dir(run_dir) / str(step), meta.get("family", "bert"), meta["spec"], spec)
    trainable_paths = set(meta["trainable_paths"])
    with_frozen = bool(meta.get(FROZEN_SAVED, True))
    parts: dict[str, dict] = {"trainable": {}, "frozen": {}}
    for (path, var), (_, sh) in zip(nnx.to_flat_state(abstract_params), nnx.to_flat_state(shardings)):
        key = "trainable" if "/".join(map(str, path)) in trainable_paths else "frozen"
        parts[key][path] = var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh.get_value()))
    target = {k: nnx.to_pure_dict(nnx.from_flat_state(v)) for k, v in parts.items() if with_frozen or k == "trainable"}
    check_tree(run_dir, step, target)
    path = checkpoint_dir(run_dir) / str(step) / "state"
    # Shardings come from `target` (this process's mesh), never from the saved _sharding file, so a run
    # trained on 8 devices is read on 1; the optimizer state is not read at all.
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: unreadable array data ({_root_cause(e)})") from None
    abstract_frozen = nnx.from_flat_state(parts["frozen"])
    if with_frozen:
        frozen = _replace_pure(abstract_frozen, restored["frozen"])
    else:
        frozen = _frozen_from_source(path, abstract_frozen, meta, load_frozen)
    merged = nnx.merge_state(_replace_pure(nnx.from_flat_state(parts["trainable"]), restored["trainable"]), frozen)
    return merged, meta, step


def _replace_pure(state: nnx.State, pure: dict) -> nnx.State:
    out = jax.tree.map(lambda x: x, state)  # a copy: replace_by_pure_dict mutates in place
    nnx.replace_by_pure_dict(out, pure)
    return out
