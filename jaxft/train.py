"""`train()`: the run pipeline as a list of named calls, from config to a fine-tuned, checkpointed model."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import checkpoint, compile, freeze, loop, mesh, optim, pretrained, sharding
from jaxft.config import Config, to_dict
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


def check_run_dir(run_dir: Path) -> None:
    """A run dir with checkpoints belongs to an earlier run; never write over it."""
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
        raise checkpoint.RunCheckpointError(f"{run_dir}: run dir already holds checkpoints; pass a new --run-dir")


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


def evaluate_fn(eval_step, sources: pipeline.Sources, encoder: pipeline.Encoder, cfg: Config, m):
    def evaluate(state: TrainState) -> dict[str, float]:
        if sources.eval is None:
            return {}
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        batches = pipeline.iter_eval_batches(sources.eval, encoder, cfg.train.eval_batch_size)
        pending = []
        for host_batch in batches:
            pending.append(eval_step(state.trainable, state.frozen, mesh.make_global_batch(host_batch, m)))
        for stats in jax.device_get(pending):
            for k in totals:
                totals[k] += float(stats[k])
        count = max(totals["count"], 1.0)
        return {"eval_loss": totals["loss_sum"] / count, "eval_accuracy": totals["correct"] / count}

    return evaluate


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
    ):
        self.cfg, self.plan, self.groups, self.graphdef = cfg, plan, groups, graphdef
        self.schedule, self.mesh, self.meta = schedule, m, meta
        self.active = freeze.active_paths(groups, 0, cfg.freeze.unfreeze_every_steps)
        self.tx: Any = None
        self._fn: compile.Traced | None = None
        self._traces_before = 0

    @property
    def traces(self) -> int:
        return self._traces_before + (self._fn.traces if self._fn else 0)

    def build_optimizer(self, trainable: nnx.State):
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
                self.graphdef, self.tx, self.schedule, self.cfg.train.grad_accum_steps, shardings_of(state), self.mesh
            )
        return self._fn(state, batch)


def train(cfg: Config, run_dir: str | Path) -> RunResult:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    m = mesh.build_mesh(cfg.mesh)
    mesh.check_batch(cfg.train.batch_size, m, microbatches=cfg.train.grad_accum_steps)
    mesh.check_batch(cfg.train.eval_batch_size, m, what="train.eval_batch_size")
    sources = pipeline.open_sources(cfg.data, task=cfg.model.task)
    pre = pretrained.load_pretrained(cfg.model, cfg.load, m, cfg.mesh.rules, len(sources.label_names), cfg.train.seed)
    plan = build_freeze_plan(cfg, pre.params)
    log.info("freeze plan:\n%s", plan.report())
    groups = freeze.unfreeze_groups(plan, pre.spec.num_layers)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    meta: dict[str, Any] = {}
    train_step = PhasedTrainStep(cfg, plan, groups, _configured_graphdef(pre, cfg), schedule, m, meta)
    trainable, frozen = split_params((pre.graphdef, pre.params), train_step.active)
    tx = train_step.build_optimizer(trainable)
    state = create_state(trainable, frozen, tx, cfg.train.seed, _opt_shardings(tx, trainable, m), replicated(m))
    encoder = pipeline.Encoder(pre.folder, cfg.data.max_length, sources)
    train_ds = pipeline.build_train_dataset(sources.train, encoder, cfg.train.batch_size, cfg.data.shuffle_seed)
    data_iter = iter(train_ds)
    prepare_run_dir(run_dir)
    meta.update(run_metadata(cfg, plan, pre, sources, train_step.active))
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    manager = checkpoint.build_manager(run_dir, cfg.checkpoint)
    writer = _metrics_writer(run_dir)
    hooks = loop.LoopHooks(
        next_batch=lambda: mesh.make_global_batch(next(data_iter), m),
        train_step=train_step,
        evaluate=evaluate_fn(compile.jit_eval_step(train_step.graphdef, m), sources, encoder, cfg, m),
        save=lambda s, metrics: checkpoint.save_checkpoint(manager, s, data_iter.get_state(), meta, metrics),
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
    state, eval_metrics = loop.run_loop(state, 0, cadence, hooks)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return RunResult(run_dir, state, eval_metrics, sources.label_names, train_step.traces)


def _configured_graphdef(pre: pretrained.Pretrained, cfg: Config) -> nnx.GraphDef:
    model = nnx.merge(pre.graphdef, pre.params).configure(jnp.dtype(cfg.model.compute_dtype), cfg.model.remat)
    return nnx.split(model)[0]


def _opt_shardings(tx, trainable: nnx.State, m) -> Any:
    abstract = abstract_opt_state(tx, trainable)
    return sharding.shard_like_params(abstract, trainable, shardings_of(trainable), m)


def _metrics_writer(run_dir: Path):
    from jaxft.metrics import MetricsWriter

    return MetricsWriter(run_dir)


def run_metadata(
    cfg: Config, plan: freeze.FreezePlan, pre: pretrained.Pretrained, sources: pipeline.Sources, active: set[str]
) -> dict[str, Any]:
    """What a run dir needs to be understood without its config file: predict, eval, export read it."""
    return {
        "config": _jsonable(to_dict(cfg)),
        "freeze_plan": plan.to_json(),
        "trainable_paths": sorted(active),
        "source": pre.source,
        "label_names": list(sources.label_names),
        "hf_config": pre.hf_config,
        "spec": dataclasses.asdict(pre.spec),
    }


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
