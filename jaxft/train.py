"""`train()`: the run pipeline as a list of named calls, from a config to a fine-tuned, checkpointed model.

Everything it calls is built elsewhere (setup, run_dir, loop, checkpoint, data); this module only wires a run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from jaxft import checkpoint, compile, freeze, loop, optim, setup
from jaxft import evaluate as evaluate_lib
from jaxft import generate as generate_lib
from jaxft import mesh as mesh_lib
from jaxft import metrics as metrics_lib
from jaxft import run_dir as run_dir_lib
from jaxft.config import Config, ConfigError, early_stopping_metric
from jaxft.data.train_data import TrainData
from jaxft.state import TrainState, repartition, trainable_paths

log = logging.getLogger("jaxft.train")

# A freeze phase's trainable paths -> its state layout (built once per phase).
LayoutOf = Callable[[frozenset[str]], setup.StateLayout]


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    state: TrainState
    eval_metrics: dict[str, float]
    label_names: tuple[str, ...]
    traces: int  # how often the train step was traced (once per freeze phase)
    start_step: int = 0  # > 0 when the run resumed from a checkpoint
    stopped_by: str = ""  # the signal that stopped the run early, after saving


def train(cfg: Config, run_dir: str | Path, allow_config_change: bool = False) -> RunResult:
    """Fine-tunes per `cfg` into `run_dir`; a run dir that already holds checkpoints is resumed from its
    latest complete one, and the rest of the run is the same as if it had never stopped."""
    run_dir = Path(run_dir)
    metrics_lib.check_sinks(cfg.train.report_to)
    mesh = setup.build_mesh(cfg)
    data = TrainData(cfg)
    skeleton = setup.build_model(cfg, mesh, len(data.label_names))
    plan = setup.build_freeze_plan(skeleton, cfg)
    log.info("freeze plan:\n%s", plan.report())
    skeleton = setup.with_frozen_dtype(skeleton, cfg.model.frozen_dtype, plan.frozen_paths)
    phases = setup.build_phases(skeleton, plan, cfg)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    layout_of = functools.cache(functools.partial(setup.abstract_state, skeleton, plan, cfg=cfg, schedule=schedule))
    restore = functools.partial(restore_phase, run_dir, cfg, skeleton, layout_of)
    resume = run_dir_lib.find_resume_point(run_dir, cfg, skeleton, restore, allow_config_change)
    early = build_early_stopping(cfg, data, resume)
    phase, state = start_state(cfg, skeleton, phases, layout_of, resume)
    start_step = resume.step if resume else 0
    data.open(skeleton.folder, skeleton.spec, mesh)
    data_iter = iter(data.train_dataset)
    if resume:
        data_iter.set_state(run_dir_lib.data_iterator_state(resume.data))
    graphdef = setup.configured_graphdef(skeleton, cfg.model)
    step_of = functools.cache(lambda paths: setup.jit_train_step(graphdef, layout_of(paths), schedule, cfg, mesh))
    meta = run_dir_lib.run_metadata(cfg, plan, skeleton, data.label_names, phase.trainable_paths, data.prompt_kind)
    if data.images:  # the eval transform, which predict and export (preprocessor_config.json) reproduce
        meta["images"] = data.encoder.record()
    first = phase.trainable_paths
    meta["execution"] = setup.execution_record(step_of(first), layout_of(first), cfg, mesh)
    open_run_dir(run_dir, meta, start_step)
    skipped = int(resume.data.get("skipped_steps", 0)) if resume else 0
    nonfinite = loop.NonFinitePolicy(cfg.train.nonfinite, cfg.train.max_nonfinite_steps, skipped)
    saver = checkpoint.Saver(run_dir, cfg.checkpoint)
    writer = metrics_lib.MetricsWriter(
        run_dir, cfg.train.report_to, cfg.train.wandb_project, cfg.train.wandb_run_name, meta["config"]
    )

    def save(s: TrainState, metrics: dict[str, float] | None) -> None:
        # Global batches make the iterator state the same on every process: it is stored once.
        data_state = {"iterator": data_iter.get_state(), "skipped_steps": nonfinite.skipped}
        data_state["early_stopping"] = early.state()
        saver.save(s, data_state, {**meta, "trainable_paths": trainable_paths(s)}, metrics)

    hooks = loop.LoopHooks(
        next_batch=lambda: mesh_lib.make_global_batch(next(data_iter), mesh, data.train_rows),
        phase_at=phases.phase_at,
        build_step=functools.partial(build_phase_step, step_of, layout_of),
        evaluate=build_run_evaluate(cfg, skeleton, graphdef, data, run_dir, mesh),
        save=save,
        write_metrics=writer.write,
        enter_phase=enter_phase,
        after_eval=early.observe,
    )
    try:
        if early.stopped_at:  # resumed after it stopped early: nothing is left to do
            result = loop.LoopResult(state, {}, early.reason())
        else:
            with loop.StopRequest() as stop:
                result = loop.run_loop(
                    state, start_step, phase, cadence(cfg), dataclasses.replace(hooks, should_stop=stop), nonfinite
                )
        saver.finish()
    finally:
        saver.close()
        writer.close()
    data.report()
    return RunResult(
        run_dir, result.state, result.eval_metrics, data.label_names, result.traces, start_step, result.stopped_by
    )


def build_early_stopping(cfg: Config, data: TrainData, resume: run_dir_lib.ResumePoint | None) -> loop.EarlyStopping:
    """Early stopping as configured, counting on from the checkpoint's state on a resume."""
    metric, mode = early_stopping_metric(cfg)
    if cfg.train.early_stopping_patience and data.sources.eval is None:
        raise ConfigError(f"train.early_stopping_patience: {metric} is never computed: the data has no eval split")
    state = resume.data.get("early_stopping") if resume else None
    return loop.EarlyStopping(
        metric, mode, cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta, state
    )


def restore_phase(
    run_dir: Path, cfg: Config, skeleton: setup.ModelSkeleton, layout_of: LayoutOf, step: int, meta: dict[str, Any]
) -> TrainState:
    """Checkpoint `step`, restored into the abstract state of the freeze phase it was saved in, in this mesh's
    shardings; frozen parameters it left out come from the recorded pretrained files."""
    layout = layout_of(frozenset(meta["trainable_paths"]))

    def load_frozen(abstract_frozen, step_meta: dict[str, Any]):
        return setup.load_frozen(skeleton, cfg.model, cfg.load, abstract_frozen, step_meta["source"])

    return checkpoint.restore_checkpoint(run_dir, layout.abstract, layout.shardings, step, load_frozen)


def start_state(
    cfg: Config,
    skeleton: setup.ModelSkeleton,
    phases: freeze.FreezePhases,
    layout_of: LayoutOf,
    resume: run_dir_lib.ResumePoint | None,
) -> tuple[freeze.FreezePhase, TrainState]:
    """The first step's freeze phase and state: the checkpoint's, or phase 0's from the pretrained weights."""
    if resume is not None:
        return phases.phase_of(resume.trainable_paths), resume.state
    phase = phases.phase_at(0)
    params = setup.load_weights(skeleton, cfg.model, cfg.load, cfg.train.seed)
    return phase, setup.create_state(params, layout_of(phase.trainable_paths), cfg.train.seed)


def open_run_dir(run_dir: Path, meta: dict[str, Any], start_step: int) -> None:
    """Creates the run dir (only now that everything before could fail without writing), writes run.json, and
    drops the metrics and samples of steps after the resume point (they are replayed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir_lib.write_json(run_dir / "run.json", meta)
    metrics_lib.truncate_metrics(run_dir, start_step)
    metrics_lib.truncate_metrics(run_dir, start_step, "samples.jsonl")


def build_phase_step(step_of, layout_of: LayoutOf, phase: freeze.FreezePhase) -> loop.PhaseStep:
    """A freeze phase's jitted step (one per phase: the first was lowered for run.json already, and its calls
    reuse that trace), with the names of its trainable leaves and its layout."""
    layout = layout_of(phase.trainable_paths)
    return loop.PhaseStep(step_of(phase.trainable_paths), layout.leaf_paths, layout)


def enter_phase(state: TrainState, phase_step: loop.PhaseStep, step: int) -> TrainState:
    """Gradual unfreezing: the state repartitioned for the next phase, with a fresh optimizer state for the
    parameters that join (those already training keep theirs)."""
    layout: setup.StateLayout = phase_step.layout
    log.info("gradual unfreezing at step %d: %d trainable tensors", step, len(layout.trainable_paths))
    return repartition(state, layout.trainable_paths, layout.tx, layout.shardings.opt_state)


def build_run_evaluate(
    cfg: Config, skeleton: setup.ModelSkeleton, graphdef, data: TrainData, run_dir: Path, mesh: Mesh
) -> Callable[[TrainState], dict[str, float]]:
    """The eval of a state over the eval split, plus (causal LMs with data.sample_prompts) greedy samples."""
    evaluate = evaluate_lib.build_evaluate(
        compile.jit_eval_step(graphdef, mesh, cfg.model.task), data.eval_batches, mesh, data.eval_rows
    )
    return generate_lib.with_samples(
        lambda s: evaluate(s.trainable, s.frozen),
        cfg=cfg,
        skeleton=skeleton,
        graphdef=graphdef,
        encoder=data.encoder,
        prompt_kind=data.prompt_kind,
        run_dir=run_dir,
        mesh=mesh,
    )


def cadence(cfg: Config) -> loop.Cadence:
    images = cfg.model.task == "image-classification"
    return loop.Cadence(
        max_steps=cfg.train.max_steps,
        log_every=cfg.train.log_every_steps,
        eval_every=cfg.train.eval_every_steps,
        save_every=cfg.checkpoint.every_steps,
        tokens_per_step=cfg.train.batch_size * (1 if images else cfg.data.max_length),
        save_at_eval=cfg.train.early_stopping_patience > 0,
        unit="images" if images else "tokens",
    )
