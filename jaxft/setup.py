"""The public setup stage: a config becomes the mesh, the model skeleton (shapes and shardings, no weights), the
freeze plan and its phases, one phase's abstract train state with its shardings (the one source for both creating
and restoring a state), and the jitted step.

`train`, `plan`, the run-dir restores of eval/predict/export/generate, the tests and the benches all build through
these functions, so what `plan` lays out is what `train` compiles. It reads weights only in `load_weights` and
`load_frozen`, and it runs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxft import axes, compile, freeze, models, optim, sharding
from jaxft import mesh as mesh_lib
from jaxft import step as step_lib
from jaxft.config import Config, ConfigError, LoadConfig, LoraConfig, MeshConfig, ModelConfig
from jaxft.load import (
    CheckpointError,
    merge_checkpoint,
    open_checkpoint,
    read_hf_config,
    resolve_source,
    source_identity,
)
from jaxft.models import lora as lora_lib
from jaxft.paths import RuleError, matches_any, path_str
from jaxft.state import TrainState, init_state, partition_params

log = logging.getLogger("jaxft.setup")

# ------------------------------------------------------------------------------------------------- model


def build_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """cfg's mesh over this process's devices (or `devices`: a compile target's), checked against the train and
    eval batch sizes."""
    mesh = mesh_lib.build_mesh(cfg.mesh, devices)
    mesh_lib.check_batch(cfg.train.batch_size, mesh, microbatches=cfg.train.grad_accum_steps)
    mesh_lib.check_batch(cfg.train.eval_batch_size, mesh, what="train.eval_batch_size")
    return mesh


@dataclasses.dataclass(frozen=True)
class ModelSkeleton:
    """A model before any weight is read: what it is, where its weights come from, the shape of every parameter and
    the sharding it will live in."""

    folder: Path  # the pretrained folder (config.json, weights, tokenizer)
    hf_config: dict[str, Any]
    spec: Any  # the family's spec (models.BertSpec, models.LlamaSpec, ...)
    graphdef: nnx.GraphDef  # the model's structure, with default execution options (fp32, no remat)
    abstract_params: nnx.State  # ShapeDtypeStructs with logical axis metadata
    param_shardings: dict[str, NamedSharding]  # by '/'-joined parameter path
    mesh: Mesh
    source: dict[str, Any]  # the pretrained files' identity as run metadata records it: path and sha256s
    lora: lora_lib.LoraSpec | None = None  # adapters on the targeted layers (never in the pretrained files)

    @property
    def family(self) -> models.Family:
        return models.family_for_spec(self.spec)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {path_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(self.abstract_params)}


def scan_layers(model_cfg: ModelConfig, devices: Any = None) -> bool:
    """model.scan_layers on `devices` (default: jax.devices()): "auto" scans on TPUs and GPUs, where a stacked
    layer keeps compile time flat in depth, and not on CPUs, where XLA copies every layer's slice in and out of
    the stack each step (a per-layer Llama step ran 1.16x faster on this project's 2-core CPU: bench/README)."""
    value = str(model_cfg.scan_layers).lower()
    if value != "auto":
        return value == "true"
    return any(d.platform != "cpu" for d in (jax.devices() if devices is None else devices))


def read_spec(
    model_cfg: ModelConfig, num_labels: int, image_size: int = 0, devices: Any = None
) -> tuple[Path, dict[str, Any], Any]:
    """(pretrained folder, its config.json, the family's spec) of `model.source`; reads no weights. `devices` are
    those the model runs on (model.scan_layers="auto" depends on them).

    `image_size` (data.image_size) other than 0 sets an image model's input size: the config.json returned, which
    an export writes, says so, and the load resamples the position table to the new patch grid."""
    folder = resolve_source(model_cfg.source)
    hf = read_hf_config(folder)
    if image_size:
        if "image_size" not in hf:
            raise ConfigError(
                f"data.image_size={image_size}: {folder} is no image model (its config has no image_size)"
            )
        if image_size != hf["image_size"]:
            log.info("image size %s instead of the checkpoint's %s", image_size, hf["image_size"])
        hf = {**hf, "image_size": image_size}
    family = models.family_of(hf, model_cfg.task)
    if num_labels <= 0:
        num_labels = model_cfg.num_labels or hf.get("num_labels") or len(hf.get("id2label", {})) or 2
    spec = family.read_spec(hf, model_cfg.task, num_labels, model_cfg.dropout_rate, scan_layers(model_cfg, devices))
    return folder, hf, spec


def lora_spec(cfg: LoraConfig | None) -> lora_lib.LoraSpec | None:
    if cfg is None or cfg.rank == 0:
        return None
    return lora_lib.LoraSpec(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))


def infer_param_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> dict[str, NamedSharding]:
    return sharding.to_named_shardings(sharding.infer_param_specs(abstract_params, rules, mesh), mesh)


def skeleton_of(
    spec: Any,
    cfg: Config,
    mesh: Mesh,
    folder: Path = Path(),
    hf_config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> ModelSkeleton:
    """The skeleton of a model of `spec` (with cfg's LoRA adapters, parameter dtype and mesh rules)."""
    adapters = lora_spec(cfg.lora)
    graphdef, abstract = models.build_abstract_model(spec, cfg.model.param_dtype, adapters)
    shardings = infer_param_shardings(abstract, mesh, cfg.mesh.rules)
    return ModelSkeleton(folder, hf_config or {}, spec, graphdef, abstract, shardings, mesh, source or {}, adapters)


def build_model(cfg: Config, mesh: Mesh, num_labels: int = 0) -> ModelSkeleton:
    """The skeleton of cfg's pretrained model on `mesh`, from its config.json and checkpoint index: no weights read.
    `num_labels` (the data's label count) sizes a classifier head; 0 takes it from the config or checkpoint."""
    folder, hf, spec = read_spec(cfg.model, num_labels, cfg.data.image_size, mesh.devices.flat)
    checkpoint = open_checkpoint(folder, models.family_for_spec(spec).renames)
    return skeleton_of(spec, cfg, mesh, folder, hf, source_identity(folder, checkpoint, cfg.load.hash_files))


def with_frozen_dtype(skeleton: ModelSkeleton, dtype: str, frozen_paths: set[str]) -> ModelSkeleton:
    """The skeleton with the parameters in `frozen_paths` stored in `dtype` (model.frozen_dtype: a frozen base in
    bf16); "" leaves it as it is."""
    if not dtype:
        return skeleton
    flat = {
        p: v.replace(jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype))) if path_str(p) in frozen_paths else v
        for p, v in nnx.to_flat_state(skeleton.abstract_params)
    }
    return dataclasses.replace(skeleton, abstract_params=nnx.from_flat_state(flat))


def compute_dtype(model_cfg: ModelConfig, mesh: Mesh) -> jnp.dtype:
    """model.compute_dtype on this mesh's devices: "auto" is bf16 on TPUs and GPUs (their matrix units' dtype;
    parameters stay in param_dtype) and fp32 on CPUs, whose results then match PyTorch's (bf16 is faster only on
    CPUs with bf16 matrix instructions, and is set explicitly there)."""
    if model_cfg.compute_dtype != "auto":
        return jnp.dtype(model_cfg.compute_dtype)
    platform = mesh.devices.flat[0].platform
    return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def configured_graphdef(skeleton: ModelSkeleton, model_cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure with cfg's execution options bound: compute dtype (resolved for the skeleton's mesh),
    remat, and (decoders) logits_chunk."""
    model = nnx.merge(skeleton.graphdef, skeleton.abstract_params)
    options = {"logits_chunk": model_cfg.logits_chunk} if skeleton.family.is_decoder else {}
    model.configure(compute_dtype(model_cfg, skeleton.mesh), model_cfg.remat, **options)
    return nnx.split(model)[0]


# ----------------------------------------------------------------------------------------------- weights


def load_weights(skeleton: ModelSkeleton, model_cfg: ModelConfig, load_cfg: LoadConfig, seed: int = 0) -> nnx.State:
    """The pretrained tensors merged into the skeleton's parameters, each placed in its sharding as it is read;
    parameters on load.new_params (and LoRA adapters) that the checkpoint lacks, and those on load.reinit_params,
    are initialised from `seed` (those on load.zero_init_params to zeros)."""
    family, spec = skeleton.family, skeleton.spec
    new_params = load_cfg.new_params + load_cfg.reinit_params + ((lora_lib.ADAPTER_PARAMS,) if skeleton.lora else ())
    source = open_checkpoint(skeleton.folder, family.renames)
    prefix = family.key_prefix(spec, skeleton.hf_config, set(source.shapes))
    reinit = [p for p in skeleton.param_shapes if matches_any(p, load_cfg.reinit_params)]
    # A re-initialised parameter's checkpoint tensors are read by nothing, and expected to be there.
    entries = [family.hf_entry(p, spec, prefix) for p in reinit]
    skipped = tuple(re.escape(k) for entry in entries if entry is not None for k in entry.keys)

    def entry_of(path: str) -> models.HFEntry | None:
        return None if path in reinit else family.hf_entry(path, spec, prefix)

    def init_fresh(wanted: set[str]) -> dict[str, jax.Array]:
        values = models.init_params(spec, model_cfg.param_dtype, wanted, skeleton.param_shardings, seed, skeleton.lora)
        return {p: jnp.zeros_like(v) if matches_any(p, load_cfg.zero_init_params) else v for p, v in values.items()}

    return merge_checkpoint(
        skeleton.abstract_params,
        entry_of,
        skeleton.param_shardings,
        new_params,
        load_cfg.ignore_unused + family.ignorable_keys(spec) + skipped,
        init_fresh,
        source,
    )


def init_weights(skeleton: ModelSkeleton, param_dtype: str, seed: int = 0) -> nnx.State:
    """Random initial parameters for every path of the skeleton, in their shardings (benchmarks without a
    checkpoint)."""
    values = models.init_params(
        skeleton.spec, param_dtype, set(skeleton.param_shapes), skeleton.param_shardings, seed, skeleton.lora
    )
    return nnx.from_flat_state(
        {p: v.replace(values[path_str(p)]) for p, v in nnx.to_flat_state(skeleton.abstract_params)}
    )


def load_frozen(
    skeleton: ModelSkeleton,
    model_cfg: ModelConfig,
    load_cfg: LoadConfig,
    abstract_frozen: nnx.State,
    recorded: dict[str, Any],
) -> nnx.State:
    """The frozen parameters of a checkpoint saved without them (checkpoint.save_frozen=false), read again from
    the pretrained files it recorded (`recorded`: path and sha256 per file), which must be unchanged."""
    folder = Path(recorded.get("path", ""))
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: the pretrained model this checkpoint's frozen weights come from is gone "
            "(checkpoint.save_frozen=false keeps only the trained parameters)"
        )
    subset = dataclasses.replace(skeleton, folder=folder, abstract_params=abstract_frozen)
    # The trained parameters' tensors are in the files too; only the frozen ones are read.
    params = load_weights(subset, model_cfg, dataclasses.replace(load_cfg, ignore_unused=(r".*",)))
    checkpoint = open_checkpoint(folder, skeleton.family.renames)
    want = recorded.get("files") or {}
    have = source_identity(folder, checkpoint, load_cfg.hash_files)["files"]
    if want and have and want != have:
        changed = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        raise CheckpointError(
            f"{folder}: pretrained files changed since this checkpoint was saved ({', '.join(changed)} differ "
            "from the recorded sha256), and its frozen weights were not saved with it"
        )
    if not (want and have):
        log.warning("%s: cannot verify the pretrained files against the checkpoint (no sha256 recorded)", folder)
    return params


def load_model(
    path_or_hub_id: str,
    task: str = "sequence-classification",
    num_labels: int = 0,
    dtype: Any = "float32",
    mesh: Mesh | None = None,
    new_params: tuple[str, ...] | None = None,
    scan_layers: bool | str = "auto",
    image_size: int = 0,
) -> nnx.Module:
    """The NNX model with pretrained weights (`jaxft.load`). Encoders: `model(input_ids=..., attention_mask=...,
    token_type_ids=...)` gives logits [B, C] (or [B, L, C]); decoders (task="causal-lm"): `model(input_ids=...)`
    gives logits [B, L, V].

    Image models (task="image-classification"): `model(pixel_values=...)` [B, C, H, W] gives logits [B, C];
    `image_size` other than the checkpoint's resamples its position table to the new patch grid.

    dtype is the compute dtype (parameters stay fp32). With no mesh, parameters are replicated over all
    local devices' data axis. A missing head is initialised fresh and logged.
    """
    mesh = mesh if mesh is not None else mesh_lib.build_mesh(MeshConfig())
    model_cfg = ModelConfig(source=path_or_hub_id, task=task, num_labels=num_labels, scan_layers=scan_layers)
    cfg = Config(model=model_cfg, load=LoadConfig() if new_params is None else LoadConfig(new_params=new_params))
    folder, hf, spec = read_spec(cfg.model, num_labels, image_size, mesh.devices.flat)
    skeleton = skeleton_of(spec, cfg, mesh, folder, hf)
    params = load_weights(skeleton, cfg.model, cfg.load)
    return nnx.merge(skeleton.graphdef, params).configure(jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------------ freeze


def build_freeze_plan(skeleton: ModelSkeleton, cfg: Config) -> freeze.FreezePlan:
    """cfg's freeze rules over the skeleton's parameters. With checkpoint.save_frozen=false every frozen parameter
    must come from the pretrained files, so none may be one a load can initialise fresh (load.new_params)."""
    try:
        plan = freeze.build_freeze_plan(skeleton.param_shapes, cfg.freeze.rules)
    except RuleError as e:
        if stacked_layers(skeleton) and any(re.search(r"layers/[\d(]", r.pattern) for r in cfg.freeze.rules):
            # The rules name single layers (layer-wise LR decay, freezing the first layers) of a scanned stack.
            raise RuleError(
                f"{e}; rules on single layers need model.scan_layers=false (one tensor per layer)"
            ) from None
        raise
    fresh = sorted(p for p in plan.frozen_paths if matches_any(p, cfg.load.new_params))
    if not cfg.checkpoint.save_frozen and fresh:
        raise ConfigError(
            f"checkpoint.save_frozen=false: frozen parameter {fresh[0]} is on load.new_params, so it may not come "
            "from the pretrained files; train it or save frozen parameters"
        )
    return plan


def build_phases(skeleton: ModelSkeleton, plan: freeze.FreezePlan, cfg: Config) -> freeze.FreezePhases:
    """The freeze phases of a run: one, or with gradual unfreezing a layer group more every
    freeze.unfreeze_every_steps, top down."""
    family = skeleton.family
    if cfg.freeze.unfreeze_every_steps and stacked_layers(skeleton):
        raise ConfigError(
            "freeze.unfreeze_every_steps: gradual unfreezing needs one tensor per layer; set model.scan_layers=false"
        )
    return freeze.build_phases(
        plan, skeleton.spec.num_layers, family.layer_pattern, family.head_pattern, cfg.freeze.unfreeze_every_steps
    )


def stacked_layers(skeleton: ModelSkeleton) -> bool:
    """Whether the layers' parameters are stacked on one leading `layers` axis (scanned decoders)."""
    return any(
        (v.get_metadata().get("logical_axes") or (None,))[0] == axes.LAYERS
        for _, v in nnx.to_flat_state(skeleton.abstract_params)
    )


# ------------------------------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """One freeze phase's train state before it holds values: its optimizer, shapes and shardings. Creating a
    state and restoring one both fill exactly this."""

    trainable_paths: frozenset[str]
    tx: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # the same tree of NamedShardings
    batch: dict[str, jax.ShapeDtypeStruct] = dataclasses.field(default_factory=dict)  # one global train batch

    @property
    def leaf_paths(self) -> tuple[str, ...]:
        """The trainable parameters in jax.tree.leaves order (the step reports a non-finite gradient by index)."""
        flat, _ = jax.tree_util.tree_flatten_with_path(
            self.abstract.trainable, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        return tuple(path_str(p) for p, _ in flat)


def build_optimizer(
    cfg: Config, schedule: optax.Schedule, plan: freeze.FreezePlan, trainable: nnx.State
) -> optax.GradientTransformation:
    """The optimizer of one trainable partition, with each parameter's freeze-rule LR multiplier. Whether it has
    the multiplier stage is decided by the whole plan, not this partition, so that every phase of gradual
    unfreezing has an optimizer state of the same structure (repartition carries the statistics across)."""
    multipliers = {p: v.replace(plan.lr_multiplier(path_str(p))) for p, v in nnx.to_flat_state(trainable)}
    scaled = any(plan.lr_multiplier(p) != 1.0 for p in plan.trainable_paths)
    return optim.build_optimizer(cfg.optim, schedule, nnx.from_flat_state(multipliers), scaled)


def abstract_state(
    skeleton: ModelSkeleton,
    plan: freeze.FreezePlan,
    trainable_paths: frozenset[str],
    cfg: Config,
    schedule: optax.Schedule,
) -> StateLayout:
    """The abstract train state of the phase that trains `trainable_paths`, and its shardings: parameters where the
    skeleton puts them, optimizer state beside the parameters it tracks, step and rng replicated."""
    trainable, frozen = partition_params(skeleton.abstract_params, trainable_paths)
    tx = build_optimizer(cfg, schedule, plan, trainable)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    trainable_sh = sharding.shardings_like(trainable, skeleton.param_shardings)
    opt_sh = sharding.shard_like_params(opt_abstract, trainable, trainable_sh, skeleton.mesh)
    replicated = sharding.replicated(skeleton.mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=opt_abstract,
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    )
    shardings = TrainState(
        step=replicated,
        trainable=trainable_sh,
        frozen=sharding.shardings_like(frozen, skeleton.param_shardings),
        opt_state=opt_sh,
        rng=replicated,
    )
    batch = step_lib.batch_shapes(
        cfg.model.task, cfg.train.batch_size, cfg.data.max_length, skeleton.family.input_shape(skeleton.spec)
    )
    return StateLayout(frozenset(trainable_paths), tx, abstract, shardings, batch)


def create_state(params: nnx.State, layout: StateLayout, seed: int) -> TrainState:
    """A fresh train state of `layout`'s phase from loaded parameters (already in their shardings)."""
    trainable, frozen = partition_params(params, layout.trainable_paths)
    return init_state(trainable, frozen, layout.tx, seed, layout.shardings)


def jit_train_step(
    graphdef: nnx.GraphDef, layout: StateLayout, schedule: optax.Schedule, cfg: Config, mesh: Mesh
) -> compile.CountingJit:
    """The jitted train step of `layout`'s phase: the same call `train` runs and `plan` compiles."""
    return compile.jit_train_step(
        graphdef, layout.tx, schedule, cfg.train.grad_accum_steps, layout.shardings, mesh, cfg.model.task
    )


def abstract_train_args(layout: StateLayout, mesh: Mesh) -> tuple[TrainState, dict[str, Any]]:
    """The train step's arguments as sharded ShapeDtypeStructs: `layout`'s state and one global batch."""
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)
    return state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in layout.batch.items()}


def lower_train_step(step: compile.CountingJit, layout: StateLayout, cfg: Config, mesh: Mesh) -> Any:
    """The jitted step lowered from shapes alone (abstract_train_args). The step's later calls on real arrays of
    these shapes and shardings reuse this trace."""
    return step.lower(*abstract_train_args(layout, mesh))


def attention_implementation(program: str) -> str:
    """Which attention a lowered or compiled program runs: cuDNN's fused kernel ("cudnn"), a TPU Pallas/Mosaic
    kernel ("tpu-kernel"), or XLA's own ops ("xla")."""
    if "cudnn$fmha" in program:
        return "cudnn"
    if "tpu_custom_call" in program:
        return "tpu-kernel"
    return "xla"


def execution_record(step: compile.CountingJit, layout: StateLayout, cfg: Config, mesh: Mesh) -> dict[str, str]:
    """How the train step runs, for run.json: the platform, the resolved compute dtype and the attention the
    lowered step holds."""
    program = lower_train_step(step, layout, cfg, mesh).as_text()
    return {
        "platform": mesh.devices.flat[0].platform,
        "compute_dtype": str(compute_dtype(cfg.model, mesh)),
        "attention": attention_implementation(program),
    }


# ---------------------------------------------------------------------------------------- tests, benches


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything between a config and the first train step, built as `train` builds it."""

    cfg: Config
    mesh: Mesh
    skeleton: ModelSkeleton
    plan: freeze.FreezePlan
    phases: freeze.FreezePhases
    schedule: optax.Schedule
    graphdef: nnx.GraphDef  # configured (compute dtype, remat, logits_chunk)
    layout: StateLayout  # of the first phase
    state: TrainState
    step: compile.CountingJit

    @property
    def tx(self) -> optax.GradientTransformation:
        return self.layout.tx


def build_train_setup(
    cfg: Config, num_labels: int = 2, skeleton: ModelSkeleton | None = None, params: nnx.State | None = None
) -> TrainSetup:
    """mesh → skeleton → freeze plan → abstract state → state from the pretrained weights → jitted step, for
    `cfg` as `train` would build them. `skeleton` and `params` replace the pretrained model (e.g. a random one)."""
    mesh = build_mesh(cfg) if skeleton is None else skeleton.mesh
    skeleton = skeleton or build_model(cfg, mesh, num_labels)
    plan = build_freeze_plan(skeleton, cfg)
    skeleton = with_frozen_dtype(skeleton, cfg.model.frozen_dtype, plan.frozen_paths)
    phases = build_phases(skeleton, plan, cfg)
    schedule = optim.build_schedule(cfg.optim, cfg.train.max_steps)
    layout = abstract_state(skeleton, plan, phases.phase_at(0).trainable_paths, cfg, schedule)
    if params is None:
        params = load_weights(skeleton, cfg.model, cfg.load, cfg.train.seed)
    state = create_state(params, layout, cfg.train.seed)
    graphdef = configured_graphdef(skeleton, cfg.model)
    step = jit_train_step(graphdef, layout, schedule, cfg, mesh)
    return TrainSetup(cfg, mesh, skeleton, plan, phases, schedule, graphdef, layout, state, step)
