"""`jaxft plan`: parameters, shardings, freeze status and per-device memory, from shapes alone.

It reads only the checkpoint's config.json and builds no array on any device.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import mesh as mesh_lib
from jaxft import optim, setup
from jaxft.config import Config
from jaxft.data import pipeline
from jaxft.paths import path_str


def _shard_bytes(shape, dtype, spec, mesh: Mesh) -> int:
    parts = 1
    for names in spec:
        for n in (names,) if isinstance(names, str) else (names or ()):
            parts *= mesh.shape[n]
    return math.prod(shape) * np.dtype(dtype).itemsize // parts


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def describe_plan(cfg: Config) -> str:
    """The table `jaxft plan` prints: every parameter's shape, dtype, sharding and freeze status, the freeze
    report, and per-device bytes of parameters, gradients and optimizer state, laid out as `train` lays them."""
    mesh = mesh_lib.build_mesh(cfg.mesh)
    if cfg.model.task == "causal-lm":
        labels: tuple[str, ...] = ()  # an LM's head is its vocabulary: no data needed to shape it
    else:
        labels = pipeline.open_sources(cfg.data, need_eval=False, task=cfg.model.task).label_names
    folder, hf, spec = setup.read_spec(cfg.model, len(labels))
    skeleton = setup.skeleton_of(spec, cfg, mesh, folder, hf)
    plan = setup.build_freeze_plan(skeleton, cfg)
    skeleton = setup.with_frozen_dtype(skeleton, cfg.model.frozen_dtype, plan.frozen_paths)
    trainable_paths = frozenset(plan.trainable_paths)
    specs = {name: s.spec for name, s in skeleton.param_shardings.items()}
    width = max(28, *(len(str(s)) for s in specs.values()))
    lines = [
        f"mesh: data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
        f"({mesh.devices.size} devices)",
        "",
        f"{'parameter':<48} {'shape':<16} {'dtype':<8} {'sharding':<{width}} {'status':<10} rule",
    ]
    totals = {"params": 0, "grads": 0}
    for p, v in nnx.to_flat_state(skeleton.abstract_params):
        name = path_str(p)
        status = "train" if name in trainable_paths else "frozen"
        if name in trainable_paths and plan.lr_multiplier(name) != 1.0:
            status = f"train×{plan.lr_multiplier(name):g}"
        nbytes = _shard_bytes(v.shape, v.dtype, specs[name], mesh)
        totals["params"] += nbytes
        totals["grads"] += nbytes if name in trainable_paths else 0
        lines.append(
            f"{name:<48} {list(v.shape)!s:<16} {v.dtype!s:<8} {specs[name]!s:<{width}} "
            f"{status:<10} {plan.rule_of[name]}: {plan.rule_for(name).pattern}"
        )
    layout = setup.abstract_state(
        skeleton, plan, trainable_paths, cfg, optim.build_schedule(cfg.optim, cfg.train.max_steps)
    )
    totals["optimizer"] = sum(
        _shard_bytes(x.shape, x.dtype, s.spec, mesh)
        for x, s in zip(jax.tree.leaves(layout.abstract.opt_state), jax.tree.leaves(layout.shardings.opt_state))
    )
    lines += ["", plan.report(), "", "per-device memory (largest shard per device):"]
    for k in ("params", "grads", "optimizer"):
        lines.append(f"  {k:<10} {_fmt(totals[k])}")
    lines.append(f"  {'total':<10} {_fmt(sum(totals.values()))}  (before activations)")
    return "\n".join(lines)
