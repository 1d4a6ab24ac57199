"""`jaxft plan`: parameters, shardings, freeze status and per-device memory, from shapes alone.

It reads only the checkpoint's config.json and builds no array on any device.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxft import freeze, mesh, models, optim, pretrained, sharding
from jaxft.config import Config
from jaxft.data import pipeline
from jaxft.paths import path_str
from jaxft.state import split_params


def _shard_bytes(shape, dtype, spec, m: Mesh) -> int:
    parts = 1
    for names in spec:
        for n in (names,) if isinstance(names, str) else (names or ()):
            parts *= m.shape[n]
    return math.prod(shape) * np.dtype(dtype).itemsize // parts


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def describe_plan(cfg: Config) -> str:
    m = mesh.build_mesh(cfg.mesh)
    if cfg.model.task == "causal-lm":
        labels: tuple[str, ...] = ()  # an LM's head is its vocabulary: no data needed to shape it
    else:
        labels = pipeline.open_sources(cfg.data, need_eval=False, task=cfg.model.task).label_names
    _, _, spec = pretrained.read_spec(cfg.model, len(labels))
    _, abstract = models.build_abstract_model(spec, cfg.model.param_dtype, pretrained.lora_spec(cfg.lora))
    specs = sharding.infer_param_specs(abstract, cfg.mesh.rules, m)
    shapes = {path_str(p): tuple(v.shape) for p, v in abstract.flat_state()}
    plan = freeze.build_freeze_plan(shapes, cfg.freeze.rules)
    trainable_paths = set(plan.trainable_paths)
    if cfg.model.frozen_dtype:  # frozen weights stored as training stores them
        abstract = pretrained.cast_abstract(abstract, cfg.model.frozen_dtype, set(shapes) - trainable_paths)
    width = max(28, *(len(str(s)) for s in specs.values()))
    lines = [
        f"mesh: data={m.shape['data']} fsdp={m.shape['fsdp']} tensor={m.shape['tensor']} ({m.devices.size} devices)",
        "",
        f"{'parameter':<48} {'shape':<16} {'dtype':<8} {'sharding':<{width}} {'status':<10} rule",
    ]
    totals = {"params": 0, "grads": 0}
    for p, v in abstract.flat_state():
        name = path_str(p)
        status = "train" if name in trainable_paths else "frozen"
        if name in trainable_paths and plan.lr_multiplier(name) != 1.0:
            status = f"train×{plan.lr_multiplier(name):g}"
        nbytes = _shard_bytes(v.shape, v.dtype, specs[name], m)
        totals["params"] += nbytes
        totals["grads"] += nbytes if name in trainable_paths else 0
        lines.append(
            f"{name:<48} {list(v.shape)!s:<16} {v.dtype!s:<8} {specs[name]!s:<{width}} "
            f"{status:<10} {plan.rule_of[name]}: {plan.rules[plan.rule_of[name]][0]}"
        )
    trainable, _ = split_params((None, abstract), trainable_paths)
    tx = optim.build_optimizer(cfg.optim, optim.build_schedule(cfg.optim, cfg.train.max_steps))
    opt_abstract = jax.eval_shape(tx.init, trainable)
    shardings = sharding.tree_shardings(trainable, sharding.named(specs, m))
    opt_shardings = sharding.shard_like_params(opt_abstract, trainable, shardings, m)
    totals["optimizer"] = sum(
        _shard_bytes(x.shape, x.dtype, s.spec, m)
        for x, s in zip(jax.tree.leaves(opt_abstract), jax.tree.leaves(opt_shardings))
    )
    lines += ["", plan.report(), "", "per-device memory (largest shard per device):"]
    for k in ("params", "grads", "optimizer"):
        lines.append(f"  {k:<10} {_fmt(totals[k])}")
    lines.append(f"  {'total':<10} {_fmt(sum(totals.values()))}  (before activations)")
    return "\n".join(lines)
