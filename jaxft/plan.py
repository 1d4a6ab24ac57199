"""`jaxft plan`: parameters, shardings, freeze status and per-device memory, from shapes alone; with a target,
the train step compiled ahead of time for that target's devices, and whether it fits.

It reads only the checkpoint's config.json and builds no array on any device. The model, freeze plan, state
layout and jitted step come from the same setup calls `train` makes, so the step compiled here is the one
`train` runs (on the target's devices, with the compute dtype resolved for them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.extend
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import freeze, hostmem, optim, setup, targets
from jaxft import mesh as mesh_lib
from jaxft.config import Config
from jaxft.data import image_pipeline, pipeline
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


@dataclasses.dataclass(frozen=True)
class PlanParts:
    """What `train` builds before it reads a weight, on a mesh over `devices`."""

    cfg: Config
    mesh: Mesh
    skeleton: setup.ModelSkeleton
    plan: freeze.FreezePlan
    layout: setup.StateLayout  # of the first freeze phase
    schedule: Any


def build_parts(cfg: Config, devices: list | None = None) -> PlanParts:
    mesh = setup.build_mesh(cfg, devices)
    if cfg.model.task == "causal-lm":
        labels: tuple[str, ...] = ()  # an LM's head is its vocabulary: no data needed to shape it
    elif cfg.model.task == "image-classification":
        labels = image_pipeline.label_names(cfg.data)  # no images read
    else:
        labels = pipeline.open_sources(cfg.data, need_eval=False, task=cfg.model.task).label_names
    folder, hf, spec = setup.read_spec(cfg.model, len(labels), cfg.data.image_size, mesh.devices.flat)
    skeleton = setup.skeleton_of(spec, cfg, mesh, folder, hf)
    plan = setup.build_freeze_plan(skeleton, cfg)
    skeleton = setup.with_frozen_dtype(skeleton, cfg.model.frozen_dtype, plan.frozen_paths)
    phases = setup.build_phases(skeleton, plan, cfg)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    layout = setup.abstract_state(skeleton, plan, phases.phase_at(0).trainable_paths, cfg, schedule)
    return PlanParts(cfg, mesh, skeleton, plan, layout, schedule)


def memory_tallies(parts: PlanParts) -> dict[str, int]:
    """Per-device bytes of parameters, gradients and optimizer state: each leaf's largest shard, summed."""
    mesh, layout = parts.mesh, parts.layout
    specs = {name: s.spec for name, s in parts.skeleton.param_shardings.items()}
    totals = {"params": 0, "grads": 0, "optimizer": 0}
    for p, v in nnx.to_flat_state(parts.skeleton.abstract_params):
        nbytes = _shard_bytes(v.shape, v.dtype, specs[path_str(p)], mesh)
        totals["params"] += nbytes
        totals["grads"] += nbytes if path_str(p) in layout.trainable_paths else 0
    totals["optimizer"] = sum(
        _shard_bytes(x.shape, x.dtype, s.spec, mesh)
        for x, s in zip(jax.tree.leaves(layout.abstract.opt_state), jax.tree.leaves(layout.shardings.opt_state))
    )
    return totals


def describe_plan(cfg: Config) -> str:
    """The table `jaxft plan` prints: every parameter's shape, dtype, sharding and freeze status, the freeze
    report, and per-device bytes of parameters, gradients and optimizer state, laid out as `train` lays them."""
    parts = build_parts(cfg)
    mesh, skeleton, plan = parts.mesh, parts.skeleton, parts.plan
    specs = {name: s.spec for name, s in skeleton.param_shardings.items()}
    width = max(28, *(len(str(s)) for s in specs.values()))
    lines = [
        f"mesh: data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} "
        f"({mesh.devices.size} devices)",
        "",
        f"{'parameter':<48} {'shape':<16} {'dtype':<8} {'sharding':<{width}} {'status':<10} rule",
    ]
    for p, v in nnx.to_flat_state(skeleton.abstract_params):
        name = path_str(p)
        status = "train" if name in parts.layout.trainable_paths else "frozen"
        if status == "train" and plan.lr_multiplier(name) != 1.0:
            status = f"train×{plan.lr_multiplier(name):g}"
        lines.append(
            f"{name:<48} {list(v.shape)!s:<16} {v.dtype!s:<8} {specs[name]!s:<{width}} "
            f"{status:<10} {plan.rule_of[name]}: {plan.rule_for(name).pattern}"
        )
    totals = memory_tallies(parts)
    lines += ["", plan.report(), "", "per-device memory (largest shard per device):"]
    for k in ("params", "grads", "optimizer"):
        lines.append(f"  {k:<10} {_fmt(totals[k])}")
    lines.append(f"  {'total':<10} {_fmt(sum(totals.values()))}  (before activations)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- --target

MFU = 0.4  # the model-FLOPs utilisation a step-time estimate assumes


def compile_train_step(parts: PlanParts) -> dict[str, Any]:
    """The first phase's train step compiled ahead of time for the parts' devices: XLA's per-device bytes,
    the step's FLOPs and the attention implementation in the compiled program.

    A TPU compile that cannot fit the chip fails in XLA with the bytes its temporaries need; that is a result
    here, not an error: the arguments are then counted from the state's shards, and `compiled` is false."""
    cfg, layout, mesh = parts.cfg, parts.layout, parts.mesh
    graphdef = setup.configured_graphdef(parts.skeleton, cfg.model)
    step = setup.jit_train_step(graphdef, layout, parts.schedule, cfg, mesh)
    traced = step.trace(*setup.abstract_train_args(layout, mesh))
    lowered = traced.lower()
    program = lowered.as_text()
    flops = matmul_flops(traced.jaxpr, mesh.devices.flat[0].platform) / mesh.size or None
    out = {"compute_dtype": str(setup.compute_dtype(cfg.model, mesh))}
    # XLA's GPU compiler warns, where remat cannot bring a step under the device's memory, by how much; the
    # report says so, once.
    noise = ("hlo_rematerialization.cc",) if mesh.devices.flat[0].platform in ("gpu", "cuda") else ()
    try:
        with hostmem.dropping_stderr_lines(noise):
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        needed = _out_of_memory(str(e))
        if needed is None:
            raise
        abstract = jax.tree.leaves(setup.abstract_train_args(layout, mesh))
        args = sum(_shard_bytes(x.shape, x.dtype, x.sharding.spec, mesh) for x in abstract)
        out["attention"] = setup.attention_implementation(program)
        per_device = {"argument_bytes": args, "output_bytes": None, "alias_bytes": None, "temp_bytes": needed[0]}
        per_device["peak_bytes"] = args + needed[0]
        return {**out, "compiled": False, "per_device": per_device, "flops_per_step": flops, "xla_hbm_bytes": needed[1]}
    mem = compiled.memory_analysis()
    per_device = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
    }
    # Donated state buffers are reused for the new state: outputs that alias an argument take no more room.
    per_device["peak_bytes"] = (
        per_device["argument_bytes"] + per_device["output_bytes"] - per_device["alias_bytes"] + per_device["temp_bytes"]
    )
    out["attention"] = setup.attention_implementation(program + compiled.as_text())
    return {
        **out,
        "compiled": True,
        "per_device": per_device,
        "flops_per_step": flops,
        "xla_hbm_bytes": None,
    }


def matmul_flops(jaxpr: jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr, platform: str = "") -> float:
    """The matrix-multiply FLOPs of a traced program (2 per multiply-add of each dot_general and convolution),
    with a scan's body counted once per iteration, a cond's costliest branch, and a while loop's body once.
    XLA's own cost analysis counts a scanned layer stack's body once, not once per layer; this is the count an
    MFU figure is taken against. Where the program branches on the platform (lax.platform_dependent), the branch
    `platform` (a device's: cpu, gpu, tpu) compiles to is counted; with none given, the costliest."""
    total = 0.0
    chosen: dict[Any, int] = {}  # a platform_index result -> the branch `platform` takes
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        name = eqn.primitive.name
        if name == "platform_index" and platform:
            chosen[eqn.outvars[0]] = _platform_branch(eqn.params["platforms"], platform)
        elif name == "cond" and eqn.invars[0] in chosen:
            total += matmul_flops(eqn.params["branches"][chosen[eqn.invars[0]]], platform)
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # the kernel: its input-feature and spatial dims, in any layout
            out = eqn.outvars[0].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
        elif name == "cond":
            total += max(matmul_flops(b, platform) for b in eqn.params["branches"])
        else:
            inner = sum(matmul_flops(j, platform) for j in _jaxprs_in(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _platform_branch(platforms: tuple, platform: str) -> int:
    """The branch of a platform_index (`platforms`: one tuple of lowering platform names a branch, None for the
    default) that a device platform takes."""
    names = {"gpu": ("cuda", "rocm")}.get(platform, (platform,))
    for i, group in enumerate(platforms):
        if group is not None and any(n in group for n in names):
            return i
    return platforms.index(None)


def _jaxprs_in(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                found.append(v)
    return found


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory(message: str) -> tuple[int, int | None] | None:
    """(bytes needed for temporaries, bytes the compiler had) from XLA's out-of-HBM compile error, else None."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    sizes = [float(n) * _UNITS[u] for n, u in re.findall(r"\(([\d.]+)([KMGT]?)\)", message)]
    if not sizes:
        return None
    return int(sizes[0]), int(sizes[1]) if len(sizes) > 1 else None


def plan_target(cfg: Config, target_name: str, advise: bool = True) -> dict[str, Any]:
    """`jaxft plan --target`: the compiled step's per-device memory on the target against its HBM, FLOPs and an
    estimated step time, the parameter/gradient/optimizer tallies, and (when it does not fit) advice, each
    piece of which was checked by planning again."""
    target = targets.resolve_target(target_name)
    report = _plan_on(cfg, target)
    report["advice"] = _advice(cfg, target, report) if advise and report["fits"] is False else []
    return report


def _plan_on(cfg: Config, target: targets.Target) -> dict[str, Any]:
    parts = build_parts(cfg, target.devices)
    compiled = compile_train_step(parts)
    peak = compiled["per_device"]["peak_bytes"]
    hbm = target.hbm_bytes
    flops = compiled["flops_per_step"]
    fits = None if hbm is None else (compiled["compiled"] and peak <= hbm)
    mesh = parts.mesh
    return {
        "target": target.name,
        "topology": target.topology,
        "platform": target.platform,
        "devices": len(target.devices),
        "mesh": {a: int(mesh.shape[a]) for a in mesh_lib.AXES},
        # model.scan_layers as resolved for the target ("auto": scanned on TPUs and GPUs); None: no layer stack
        "scan_layers": getattr(parts.skeleton.spec, "scan_layers", None),
        **compiled,
        "hbm_bytes_per_device": hbm,
        "hbm_source": target.source,
        "fits": fits,
        "margin_bytes": None if hbm is None else hbm - peak,
        "peak_flops_per_device": target.peak_flops,
        "mfu_assumed": MFU,
        "est_step_seconds": flops / (target.peak_flops * MFU) if target.peak_flops and flops else None,
        "tallies_per_device": memory_tallies(parts),
    }


def _candidates(cfg: Config, mesh: dict[str, int]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Changes that cut per-device memory, cheapest in speed first; each as (what a user types, derive kwargs).
    `mesh` is the planned mesh's axis sizes."""
    out: list[tuple[str, dict[str, dict[str, Any]]]] = []
    devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    dp = mesh["data"] * mesh["fsdp"]  # the rows a step splits over
    if mesh["fsdp"] != devices and cfg.train.batch_size % devices == 0:
        out.append((f"mesh.data=1 mesh.fsdp={devices}", {"mesh": {"data": 1, "fsdp": devices, "tensor": 1}}))
        dp = devices
    if cfg.model.remat == "none":
        out.append(("model.remat=full", {"model": {"remat": "full"}}))
    accum = cfg.train.grad_accum_steps * 4
    if cfg.train.batch_size % (accum * dp) == 0:
        out.append((f"train.grad_accum_steps={accum}", {"train": {"grad_accum_steps": accum}}))
    if cfg.model.task == "causal-lm" and cfg.lora.rank == 0:
        rules = [r.to_json() for r in freeze.train_adapters_only()]
        lora = {"lora": {"rank": 16}, "model": {"frozen_dtype": "bfloat16"}, "freeze": {"rules": rules}}
        out.append(("lora.rank=16 model.frozen_dtype=bfloat16 freeze.rules=<adapters only>", lora))
    return out


def _merge(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {**a.get(k, {}), **b.get(k, {})} for k in a.keys() | b.keys()}


def _advice(cfg: Config, target: targets.Target, report: dict[str, Any]) -> list[str]:
    """Each candidate alone, then all so far together, planned again until one fits; every line says what was
    measured. A candidate the config cannot take (a mesh that does not divide, say) is skipped."""
    advice, combined, labels = [], {}, []
    for label, change in _candidates(cfg, report["mesh"]):
        tries = [(label, change)]
        if combined:
            tries.append((" ".join([*labels, label]), _merge(combined, change)))
        for text, derived in tries:
            try:
                again = _plan_on(cfg.derive(**derived), target)
            except (ValueError, TypeError) as e:
                advice.append(f"{text} → not possible here ({str(e).splitlines()[0]})")
                continue
            peak = again["per_device"]["peak_bytes"]
            advice.append(f"{text} → {_fmt(peak)}/device, {'fits' if again['fits'] else 'does not fit'}")
            if again["fits"]:
                return advice
        combined, labels = _merge(combined, change), [*labels, label]
    return advice


def render_target(report: dict[str, Any]) -> str:
    """The text `jaxft plan --target` prints."""
    pd, hbm, mesh = report["per_device"], report["hbm_bytes_per_device"], report["mesh"]
    shape = f" ({report['topology']})" if report["topology"] not in ("", report["target"]) else ""
    lines = [
        f"target: {report['target']}{shape}, {report['devices']} devices; "
        f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}",
        f"train step (compute {report['compute_dtype']}, attention: {report['attention']}"
        + {True: ", layers scanned", False: ", layers unrolled"}.get(report.get("scan_layers"), "")
        + "), per device:",
    ]
    if report["compiled"]:
        lines += [
            f"  arguments {_fmt(pd['argument_bytes'])}   (parameters, optimizer state, batch)",
            f"  temp      {_fmt(pd['temp_bytes'])}   (activations, scratch)",
            f"  output    {_fmt(pd['output_bytes'])}, of which {_fmt(pd['alias_bytes'])} reuse donated arguments",
            f"  peak      {_fmt(pd['peak_bytes'])}",
        ]
    else:
        had = f" of the {_fmt(report['xla_hbm_bytes'])} it had" if report["xla_hbm_bytes"] else ""
        lines += [
            f"  XLA stopped the compile: its temporaries need {_fmt(pd['temp_bytes'])}{had}",
            f"  arguments {_fmt(pd['argument_bytes'])}   (parameters, optimizer state, batch: counted from shards)",
            f"  peak      at least {_fmt(pd['peak_bytes'])}",
        ]
    tallies = report["tallies_per_device"]
    lines.append("  plan's own tally: " + ", ".join(f"{k} {_fmt(v)}" for k, v in tallies.items()))
    if hbm is None:
        lines.append("memory per device: unknown on this target")
    else:
        verdict = "fits" if report["fits"] else "does NOT fit"
        margin = _fmt(abs(report["margin_bytes"])) + ("" if report["margin_bytes"] >= 0 else " short")
        lines.append(f"memory per device: {_fmt(hbm)} ({report['hbm_source']}): {verdict}, margin {margin}")
    if report["flops_per_step"]:
        lines.append(f"matmul FLOPs per step per device: {report['flops_per_step']:.3g}")
    if report["est_step_seconds"] is not None:
        lines.append(f"estimated step time at {report['mfu_assumed']:.0%} MFU: {report['est_step_seconds']:.3g} s")
    if report["advice"]:
        lines += ["advice (each planned again):", *(f"  {a}" for a in report["advice"])]
    return "\n".join(lines)
