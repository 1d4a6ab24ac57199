"""`train()`: the run pipeline as a list of named calls, from config to a fine-tuned, checkpointed model."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import checkpoint, compile, freeze, loop, mesh, optim, pretrained, sharding
from jaxft import evaluate as evaluate_lib
from jaxft import generate as generate_lib
from jaxft import metrics as metrics_lib
from jaxft.config import Config, ConfigError, to_dict
from jaxft.data import pipeline
from jaxft.sharding import replicated
from jaxft.state import TrainState, abstract_opt_state, create_state, repartition, split_params

log = logging.getLogger("jaxft.train")


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    state: TrainState
    eval_metrics: dict[str, float]
    label_names: tuple[str, ...]
    traces: int  # how often the train step was traced (once per freeze phase)
    start_step: int = 0  # > 0 when the run resumed from a checkpoint
    stopped_by: str = ""  # the signal that stopped the run early, after saving


# Config keys that only change what is logged or kept, where, or how the math is laid out on devices.
# Anything else alters the result, and a resume with it changed is refused unless asked for.
RESUMABLE_CHANGES = (
    r"train\.(log_every_steps|eval_every_steps|eval_batch_size|sample_max_new_tokens)",
    r"checkpoint\..*",
    r"data\.(eval_split|eval_files|sample_prompts)",
    r"mesh\.(data|fsdp|tensor|rules)",
    r"model\.(remat|logits_chunk)",
)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for every config value that alters the math."""
    out = []
    # A key that a checkpoint of an older jaxft lacks had its default then: the same math as the default now.
    defaults = _jsonable(to_dict(Config()))
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = saved.get(section, {}).get(key, defaults.get(section, {}).get(key))
            if old != value and not any(re.fullmatch(p, name) for p in RESUMABLE_CHANGES):
                out.append((name, old, value))
    return out


def check_config_change(path: Path, saved: dict[str, Any], cfg: Config, allow: bool) -> None:
    changes = config_changes(saved, _jsonable(to_dict(cfg)))
    if not changes:
        return
    listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changes)
    if not allow:
        raise ConfigError(
            f"{path}: config differs from the checkpoint's in keys that change the result: {listed}; "
            "pass --allow-config-change to resume anyway"
        )
    log.warning("resuming with a changed config (--allow-config-change): %s", listed)


def prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)


def build_freeze_plan(cfg: Config, params: nnx.State) -> freeze.FreezePlan:
    shapes = {sharding.paths.path_str(p): tuple(v.shape) for p, v in params.flat_state()}
    return freeze.build_freeze_plan(shapes, cfg.freeze.rules)


def lr_multipliers(plan: freeze.FreezePlan, trainable: nnx.State) -> Any:
    flat = {p: v.replace(plan.lr_multiplier(sharding.paths.path_str(p))) for p, v in trainable.flat_state()}
    return nnx.from_flat_state(flat)


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


class PhasedTrainStep:
    """The jitted train step for the current freeze phase.

    Without gradual unfreezing there is one phase and one compile. With it, each phase boundary moves
    a layer group into the trainable partition, builds its optimizer and jits the step once more.
    """

    def __init__(
        self,
        cfg: Config,
        plan: freeze.FreezePlan,
        groups: list[list[str]],
        graphdef: nnx.GraphDef,
        schedule: Any,
        m: Any,
        meta: dict[str, Any],
        active: set[str],
    ):
        self.cfg, self.plan, self.groups, self.graphdef = cfg, plan, groups, graphdef
        self.schedule, self.mesh, self.meta = schedule, m, meta
        self.active = active  # the trainable paths of the current phase
        self.tx: Any = None
        self._fn: compile.Traced | None = None
        self._traces_before = 0

    @property
    def traces(self) -> int:
        return self._traces_before + (self._fn.traces if self._fn else 0)

    def build_optimizer(self, trainable: nnx.State):
        # The step reports a non-finite gradient by its index in jax.tree.leaves order; these name them.
        self.leaf_paths = [
            "/".join(str(getattr(k, "key", k)) for k in keypath)
            for keypath, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]
        ]
        self.tx = optim.build_optimizer(self.cfg.optim, self.schedule, lr_multipliers(self.plan, trainable))
        return self.tx

    def enter_phase(self, state: TrainState, step: int) -> TrainState:
        want = freeze.active_paths(self.groups, step, self.cfg.freeze.unfreeze_every_steps)
        if want == self.active:
            return state
        log.info("gradual unfreezing at step %d: %d trainable tensors", step, len(want))
        new_trainable, _ = split_params((None, nnx.merge_state(state.trainable, state.frozen)), want)
        tx = self.build_optimizer(new_trainable)
        self._traces_before, self._fn, self.active = self.traces, None, want
        self.meta["trainable_paths"] = sorted(want)
        return repartition(state, want, tx, _opt_shardings(tx, new_trainable, self.mesh))

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
        if self._fn is None:
            self._fn = compile.jit_train_step(
                self.graphdef,
                self.tx,
                self.schedule,
                self.cfg.train.grad_accum_steps,
                shardings_of(state),
                self.mesh,
                self.cfg.model.task,
            )
        return self._fn(state, batch)


@dataclasses.dataclass
class ResumePoint:
    step: int
    state: TrainState
    data: dict[str, Any]  # every process's iterator state, and loop counters


def train(cfg: Config, run_dir: str | Path, allow_config_change: bool = False) -> RunResult:
    """Fine-tunes per `cfg` into `run_dir`; a run dir that already holds checkpoints is resumed from its
    latest complete one, and the rest of the run is the same as if it had never stopped."""
    run_dir = Path(run_dir)
    m = mesh.build_mesh(cfg.mesh)
    mesh.check_batch(cfg.train.batch_size, m, microbatches=cfg.train.grad_accum_steps)
    mesh.check_batch(cfg.train.eval_batch_size, m, what="train.eval_batch_size")
    data = TrainData(cfg)
    pre = pretrained.build_abstract(cfg.model, m, cfg.mesh.rules, len(data.label_names), cfg.lora)
    plan = build_freeze_plan(cfg, pre.params)
    log.info("freeze plan:\n%s", plan.report())
    frozen_paths = set(plan.rule_of) - set(plan.trainable_paths)
    pretrained.check_frozen_reloadable(frozen_paths, cfg.load, cfg.checkpoint.save_frozen)
    if cfg.model.frozen_dtype:  # frozen weights stored in another dtype; trained ones keep model.param_dtype
        pre = pretrained.with_param_dtypes(pre, cfg.model.frozen_dtype, frozen_paths)
    groups = build_unfreeze_groups(cfg, plan, pre)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    meta: dict[str, Any] = {}
    first_phase = freeze.active_paths(groups, 0, cfg.freeze.unfreeze_every_steps)
    train_step = PhasedTrainStep(cfg, plan, groups, _configured_graphdef(pre, cfg), schedule, m, meta, first_phase)
    resume = find_resume_point(run_dir, cfg, pre, train_step, allow_config_change)
    if resume is None:
        pre = pretrained.load_weights(pre, cfg.model, cfg.load, cfg.train.seed)
        trainable, frozen = split_params((pre.graphdef, pre.params), train_step.active)
        tx = train_step.build_optimizer(trainable)
        state = create_state(trainable, frozen, tx, cfg.train.seed, _opt_shardings(tx, trainable, m), replicated(m))
    else:
        state = resume.state
    start_step = resume.step if resume else 0
    data.open(pre)
    data_iter = iter(data.train_dataset)
    if resume:
        data_iter.set_state(_process_data_state(resume.data))
    prepare_run_dir(run_dir)
    meta.update(run_metadata(cfg, plan, pre, data.label_names, train_step.active))
    if data.lm:
        meta["prompt_kind"] = data.prompt_kind  # how `jaxft generate` renders prompts
    _write_json(run_dir / "run.json", meta)
    metrics_lib.truncate_metrics(run_dir, start_step)  # steps after the checkpoint are replayed
    metrics_lib.truncate_metrics(run_dir, start_step, "samples.jsonl")  # and their evals
    saver = checkpoint.Saver(run_dir, cfg.checkpoint)
    writer = metrics_lib.MetricsWriter(run_dir)
    nonfinite = loop.NonFinitePolicy(
        cfg.train.nonfinite,
        cfg.train.max_nonfinite_steps,
        lambda: train_step.leaf_paths,
        skipped=int(resume.data.get("skipped_steps", 0)) if resume else 0,
    )
    eval_step = compile.jit_eval_step(train_step.graphdef, m, cfg.model.task)
    evaluate = evaluate_lib.build_evaluate(eval_step, data.eval_batches, m)

    def save(s: TrainState, metrics: dict[str, float] | None) -> None:
        data = {"process_states": checkpoint.gather_process_states(data_iter.get_state())}
        data["skipped_steps"] = nonfinite.skipped
        saver.save(s, data, meta, metrics)

    hooks = loop.LoopHooks(
        next_batch=lambda: mesh.make_global_batch(next(data_iter), m),
        train_step=train_step,
        evaluate=generate_lib.with_samples(
            lambda s: evaluate(s.trainable, s.frozen),
            cfg,
            pre,
            train_step.graphdef,
            data.encoder,
            data.prompt_kind,
            run_dir,
            m,
        ),
        save=save,
        write_metrics=writer.write,
        before_step=train_step.enter_phase,
    )
    cadence = loop.Cadence(
        max_steps=cfg.train.max_steps,
        log_every=cfg.train.log_every_steps,
        eval_every=cfg.train.eval_every_steps,
        save_every=cfg.checkpoint.every_steps,
        tokens_per_step=cfg.train.batch_size * cfg.data.max_length,
    )
    try:
        with loop.StopRequest() as stop:
            hooks.should_stop = stop
            result = loop.run_loop(state, start_step, cadence, hooks, nonfinite)
        saver.finish()
    finally:
        saver.close()
        writer.close()
    data.report()
    return RunResult(
        run_dir,
        result.state,
        result.eval_metrics,
        data.label_names,
        train_step.traces,
        start_step,
        result.stopped_by,
    )


class TrainData:
    """The run's data, whatever the task: label names and sources first (shapes need them), then the
    tokenizer-bound train iterator and eval batches once the checkpoint folder is known."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lm = cfg.model.task == "causal-lm"
        if self.lm:
            from jaxft.data import lm

            self.sources = lm.open_lm_sources(cfg.data)
            self.label_names: tuple[str, ...] = ()
        else:
            self.sources = pipeline.open_sources(cfg.data, task=cfg.model.task)
            self.label_names = self.sources.label_names
        self.train_dataset: Any = None
        self.eval_batches: Any = None
        self.encoder: Any = None

    def open(self, pre: pretrained.Pretrained) -> None:
        cfg, data, batch = self.cfg, self.cfg.data, self.cfg.train.batch_size
        if self.lm:
            from jaxft.data import lm

            self.encoder = lm.LMEncoder(pre.folder, data, pre.spec.vocab_size)
            self.train_dataset = lm.build_lm_train_dataset(
                self.sources.train, self.encoder, batch, data.shuffle_seed, data.max_length, data.packing
            )
            if self.sources.eval is not None:
                eval_source, size = self.sources.eval, cfg.train.eval_batch_size
                self.eval_batches = lambda: lm.iter_lm_eval_batches(eval_source, self.encoder, size, data.max_length)
            return
        self.encoder = pipeline.Encoder(pre.folder, data.max_length, self.sources)
        self.train_dataset = pipeline.build_train_dataset(self.sources.train, self.encoder, batch, data.shuffle_seed)
        self.eval_batches = evaluate_lib.classification_batches(
            self.sources.eval, self.encoder, cfg.train.eval_batch_size
        )

    @property
    def prompt_kind(self) -> str:
        """Causal LM: "text" when the run trains on plain text (a prompt continues as raw text), else "chat"
        (a prompt is a user turn plus the generation prompt), as its first train record says."""
        from jaxft.data.pipeline import _text

        return _text(self.sources.train[0]["kind"]) if self.lm else ""

    def report(self) -> None:
        dropped = getattr(self.encoder, "dropped", 0)
        if dropped:
            log.warning(
                "data.truncation=drop: examples longer than data.max_length were skipped %d times "
                "(an example counts again on every pass over the data, eval included)",
                dropped,
            )


def build_unfreeze_groups(cfg: Config, plan: freeze.FreezePlan, pre: pretrained.Pretrained) -> list[list[str]]:
    family = pre.family
    if cfg.freeze.unfreeze_every_steps and getattr(pre.spec, "scan_layers", False):
        raise ConfigError(
            "freeze.unfreeze_every_steps: gradual unfreezing needs one tensor per layer; set model.scan_layers=false"
        )
    return freeze.unfreeze_groups(plan, pre.spec.num_layers, family.layer_pattern, family.head_pattern)


def find_resume_point(
    run_dir: Path, cfg: Config, pre: pretrained.Pretrained, train_step: PhasedTrainStep, allow_change: bool
) -> ResumePoint | None:
    """The newest checkpoint that restores; damaged ones (unfinished, truncated, unreadable) are skipped
    with a warning. A checkpoint of another model, or a config that changes the math, is an error."""
    problems, damaged = [], []
    checkpoint.quarantine_unreadable_metrics(run_dir)
    for step in checkpoint.all_steps(run_dir):
        path = checkpoint.checkpoint_dir(run_dir) / str(step)
        try:
            meta = checkpoint.read_meta(run_dir, step)
            data = checkpoint.read_data_state(run_dir, step)
            checkpoint.check_same_model(path, meta.get("family", "bert"), meta["spec"], pre.spec)
            check_config_change(path, meta["config"], cfg, allow_change)
            train_step.active = set(meta["trainable_paths"])
            state = _restore_state(run_dir, cfg, pre, train_step, step)
        except checkpoint.CorruptCheckpointError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            problems.append(str(e))
            damaged.append(step)
            continue
        if meta.get("source", {}).get("files") != pre.source.get("files"):
            log.warning("the pretrained files at %s changed since this run started", pre.folder)
        if len(data["process_states"]) != jax.process_count():
            log.warning(
                "resuming on %d processes; the checkpoint was saved by %d, so the data order from here on differs",
                jax.process_count(),
                len(data["process_states"]),
            )
        for bad in damaged:  # newer than the resume point: the replayed steps will save them again
            if jax.process_index() == 0:
                log.warning("moved damaged checkpoint %d to %s", bad, checkpoint.move_aside(run_dir, bad))
        if damaged and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxft: damaged checkpoints moved")
        log.info("resuming from %s", path)
        return ResumePoint(step, state, data)
    if problems:
        raise checkpoint.RunCheckpointError(
            f"{checkpoint.checkpoint_dir(run_dir)}: no usable checkpoint ({'; '.join(problems)})"
        )
    return None


def _restore_state(
    run_dir: Path, cfg: Config, pre: pretrained.Pretrained, train_step: PhasedTrainStep, step: int
) -> TrainState:
    """The abstract state of the checkpoint's freeze phase, in this mesh's shardings, filled from disk."""
    m = train_step.mesh
    trainable, frozen = split_params((pre.graphdef, pre.params), train_step.active)
    tx = train_step.build_optimizer(trainable)
    trainable_sh = sharding.tree_shardings(trainable, pre.param_shardings)
    frozen_sh = sharding.tree_shardings(frozen, pre.param_shardings)
    opt_abstract = abstract_opt_state(tx, trainable)
    opt_sh = sharding.shard_like_params(opt_abstract, trainable, trainable_sh, m)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=opt_abstract, rng=rng
    )
    shardings = TrainState(
        step=replicated(m), trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh, rng=replicated(m)
    )
    load_frozen = lambda frozen_abstract, meta: pretrained.load_frozen(
        pre, cfg.model, cfg.load, frozen_abstract, meta["source"]
    )
    return checkpoint.restore_checkpoint(run_dir, abstract, shardings, step, load_frozen)


def _process_data_state(data: dict[str, Any]) -> dict[str, Any]:
    states = data["process_states"]
    return states[jax.process_index()] if len(states) == jax.process_count() else states[0]


def _write_json(path: Path, obj: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _configured_graphdef(pre: pretrained.Pretrained, cfg: Config) -> nnx.GraphDef:
    model = nnx.merge(pre.graphdef, pre.params)
    if cfg.model.task == "causal-lm":
        model.configure(jnp.dtype(cfg.model.compute_dtype), cfg.model.remat, logits_chunk=cfg.model.logits_chunk)
    else:
        model.configure(jnp.dtype(cfg.model.compute_dtype), cfg.model.remat)
    return nnx.split(model)[0]


def _opt_shardings(tx, trainable: nnx.State, m) -> Any:
    abstract = abstract_opt_state(tx, trainable)
    return sharding.shard_like_params(abstract, trainable, shardings_of(trainable), m)


def run_metadata(
    cfg: Config, plan: freeze.FreezePlan, pre: pretrained.Pretrained, label_names: tuple[str, ...], active: set[str]
) -> dict[str, Any]:
    """What a run dir needs to be understood without its config file: predict, eval, export read it."""
    return {
        "config": _jsonable(to_dict(cfg)),
        "freeze_plan": plan.to_json(),
        "trainable_paths": sorted(active),
        "source": pre.source,
        "label_names": list(label_names),
        "hf_config": pre.hf_config,
        "family": pre.family.name,
        "spec": dataclasses.asdict(pre.spec),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
