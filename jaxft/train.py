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


def train(cfg: Config, run_dir: str | Path) -> RunResult:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    m = mesh.build_mesh(cfg.mesh)
    mesh.check_batch(cfg.train.batch_size, m, microbatches=cfg.train.grad_accum_steps)
    mesh.check_batch(cfg.train.eval_batch_size, m, what="train.eval_batch_size")
    sources = pipeline.open_sources(cfg.data)
    pre = pretrained.load_pretrained(cfg.model, cfg.load, m, cfg.mesh.rules, len(sources.label_names), cfg.train.seed)
    plan = build_freeze_plan(cfg, pre.params)
    log.info("freeze plan:\n%s", plan.report())
    groups = freeze.unfreeze_groups(plan, pre.spec.num_layers)
    active = freeze.active_paths(groups, 0, cfg.freeze.unfreeze_every_steps)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    trainable, frozen = split_params((pre.graphdef, pre.params), active)
    tx = optim.build_optimizer(cfg.optim, schedule, lr_multipliers(plan, trainable))
    state = create_state(trainable, frozen, tx, cfg.train.seed, _opt_shardings(tx, trainable, m), replicated(m))
    graphdef = _configured_graphdef(pre, cfg)
    encoder = pipeline.Encoder(pre.folder, cfg.data.max_length, sources)
    train_ds = pipeline.build_train_dataset(sources.train, encoder, cfg.train.batch_size, cfg.data.shuffle_seed)
    data_iter = iter(train_ds)
    prepare_run_dir(run_dir)
    meta = run_metadata(cfg, plan, pre, sources, active)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1))
    manager = checkpoint.build_manager(run_dir, cfg.checkpoint)
    writer = _metrics_writer(run_dir)
    steps = {"fn": None, "active": active}

    def jitted(state_: TrainState):
        if steps["fn"] is None:
            steps["fn"] = compile.jit_train_step(
                graphdef, steps["tx"], schedule, cfg.train.grad_accum_steps, shardings_of(state_), m
            )
            steps["traces_before"] = steps.get("traces_total", 0)
        return steps["fn"]

    steps["tx"] = tx

    def train_step(state_, batch):
        fn = jitted(state_)
        out = fn(state_, batch)
        steps["traces_total"] = steps["traces_before"] + fn.traces
        return out

    def before_step(state_: TrainState, step: int) -> TrainState:
        want = freeze.active_paths(groups, step, cfg.freeze.unfreeze_every_steps)
        if want == steps["active"]:
            return state_
        log.info("gradual unfreezing at step %d: %d trainable tensors", step, len(want))
        new_trainable, _ = split_params((None, nnx.merge_state(state_.trainable, state_.frozen)), want)
        steps["tx"] = optim.build_optimizer(cfg.optim, schedule, lr_multipliers(plan, new_trainable))
        steps["active"], steps["fn"] = want, None
        meta["trainable_paths"] = sorted(want)
        return repartition(state_, want, steps["tx"], _opt_shardings(steps["tx"], new_trainable, m))

    eval_step = compile.jit_eval_step(graphdef, m)
    hooks = loop.LoopHooks(
        next_batch=lambda: mesh.make_global_batch(next(data_iter), m),
        train_step=train_step,
        evaluate=evaluate_fn(eval_step, sources, encoder, cfg, m),
        save=lambda s, metrics: checkpoint.save_checkpoint(manager, s, data_iter.get_state(), meta, metrics),
        write_metrics=writer.write,
        before_step=before_step,
    )
    cadence = loop.Cadence(
        cfg.train.max_steps,
        cfg.train.log_every_steps,
        cfg.train.eval_every_steps,
        cfg.checkpoint.every_steps,
        cfg.train.batch_size * cfg.data.max_length,
    )
    state, eval_metrics = loop.run_loop(state, 0, cadence, hooks)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return RunResult(run_dir, state, eval_metrics, sources.label_names, steps.get("traces_total", 0))


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
