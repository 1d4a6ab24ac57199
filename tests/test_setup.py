"""The setup stage: the mesh's batch checks, a skeleton that reads no weights (shapes, shardings, source identity),
freeze plans, and the one abstract state: its shapes, dtypes and shardings are exactly those of the state that
build_train_setup creates, for several optimizers, a frozen bf16 base and LoRA adapters."""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import optim, setup
from jaxft.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    FreezeConfig,
    LoadConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from jaxft.load import TensorSource
from jaxft.mesh import MeshError
from jaxft.models import LlamaSpec
from jaxft.models.lora import ADAPTER_PARAMS, LoraSpec
from jaxft.paths import path_str

FREEZE_EMBEDDINGS = ((r"embeddings/.*", "freeze"), (r".*", "train"))


def config(folder, mesh=(2, 4, 1), rules=FREEZE_EMBEDDINGS, batch=8, **sections) -> Config:
    return Config(
        model=sections.pop("model", ModelConfig(source=str(folder))),
        mesh=MeshConfig(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
        freeze=FreezeConfig(rules=rules),
        train=sections.pop("train", TrainConfig(batch_size=batch, eval_batch_size=batch, max_steps=10)),
        **sections,
    )


def paths_of(state) -> list[str]:
    return [path_str(p) for p, _ in nnx.to_flat_state(state)]


# -------------------------------------------------------------------------------------------------- mesh


def test_build_mesh_of_a_fitting_config(tiny_bert):
    mesh = setup.build_mesh(config(tiny_bert, (2, 2, 2), batch=16))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "train, message",
    [
        (
            TrainConfig(batch_size=12, eval_batch_size=8),
            r"train.batch_size: 12 \(÷ 1 microbatches\) is not divisible by the data-parallel size 8",
        ),
        (
            TrainConfig(batch_size=32, grad_accum_steps=3, eval_batch_size=8),
            r"train.batch_size: 32 \(÷ 3 microbatches\) is not divisible",
        ),
        (
            TrainConfig(batch_size=16, grad_accum_steps=4, eval_batch_size=8),
            r"train.batch_size: 16 \(÷ 4 microbatches\) is not divisible by the data-parallel size 8",
        ),
        (
            TrainConfig(batch_size=8, eval_batch_size=20),
            r"train.eval_batch_size: 20 \(÷ 1 microbatches\) is not divisible by the data-parallel size 8",
        ),
    ],
)
def test_build_mesh_checks_the_batch_sizes(tiny_bert, train, message):
    with pytest.raises(MeshError, match=message):
        setup.build_mesh(config(tiny_bert, (4, 2, 1), train=train))


def test_build_mesh_batch_fits_the_data_parallel_axes_only(tiny_bert):
    # tensor=4 does not split the batch: 4 rows fit data 2 x fsdp 1.
    mesh = setup.build_mesh(config(tiny_bert, (2, 1, 4), train=TrainConfig(batch_size=4, eval_batch_size=2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}


# ---------------------------------------------------------------------------------------------- skeleton


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"read tensor {key}")

    monkeypatch.setattr(TensorSource, "get", refuse)


def test_build_model_reads_no_weights(tiny_bert, no_tensor_reads):
    cfg = config(tiny_bert)
    skeleton = setup.build_model(cfg, setup.build_mesh(cfg))
    leaves = jax.tree.leaves(skeleton.abstract_params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert skeleton.family.name == "bert"
    assert skeleton.folder == tiny_bert
    assert skeleton.hf_config["model_type"] == "bert"
    assert skeleton.lora is None
    shapes = skeleton.param_shapes
    assert shapes["embeddings/word/embedding"] == (30522, 32)
    assert shapes["encoder/layers/1/attention/query/kernel"] == (32, 4, 8)
    assert shapes["classifier/kernel"] == (32, 2)  # num_labels from config.json
    assert len(shapes) == 41


def test_param_shardings_match_the_abstract_params(tiny_bert, no_tensor_reads):
    cfg = config(tiny_bert, (2, 2, 2), batch=16)
    mesh = setup.build_mesh(cfg)
    skeleton = setup.build_model(cfg, mesh)
    assert list(skeleton.param_shardings) == paths_of(skeleton.abstract_params)
    assert all(s.mesh == mesh for s in skeleton.param_shardings.values())
    for path, var in nnx.to_flat_state(skeleton.abstract_params):
        assert len(skeleton.param_shardings[path_str(path)].spec) == len(var.shape), path_str(path)
    specs = {p: s.spec for p, s in skeleton.param_shardings.items()}
    assert specs["embeddings/word/embedding"] == PartitionSpec("tensor", "fsdp")  # vocab, embed
    assert specs["encoder/layers/0/attention/query/kernel"] == PartitionSpec("fsdp", "tensor", None)
    assert specs["encoder/layers/0/up/kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs["embeddings/norm/scale"] == PartitionSpec(None)


def test_build_model_sizes_the_head_and_records_the_source(tiny_bert, no_tensor_reads):
    cfg = config(tiny_bert)
    mesh = setup.build_mesh(cfg)
    skeleton = setup.build_model(cfg, mesh, num_labels=3)
    assert skeleton.param_shapes["classifier/kernel"] == (32, 3)
    assert skeleton.spec.num_labels == 3
    sha = hashlib.sha256((tiny_bert / "model.safetensors").read_bytes()).hexdigest()
    assert skeleton.source == {"path": str(tiny_bert), "files": {"model.safetensors": sha}}
    unhashed = setup.build_model(cfg.replace(load=LoadConfig(hash_files=False)), mesh)
    assert unhashed.source == {"path": str(tiny_bert), "files": {}}


def test_lora_spec():
    assert setup.lora_spec(None) is None
    assert setup.lora_spec(LoraConfig()) is None  # rank 0: no adapters
    assert setup.lora_spec(LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("a", "b"))) == LoraSpec(
        4, 8.0, 0.1, ("a", "b")
    )


TINY_LLAMA = LlamaSpec(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32
)


@pytest.mark.parametrize("scan", [True, False])
def test_skeleton_of_a_spec_with_adapters(scan):
    cfg = Config(lora=LoraConfig(rank=4, targets=(r".*q_proj",)), mesh=MeshConfig(data=8))
    mesh = setup.build_mesh(cfg)
    spec = dataclasses.replace(TINY_LLAMA, scan_layers=scan)
    skeleton = setup.skeleton_of(spec, cfg, mesh)
    adapters = sorted(p for p in skeleton.param_shapes if "lora" in p)
    if scan:
        assert adapters == ["layers/self_attn/q_proj/lora_a", "layers/self_attn/q_proj/lora_b"]
        assert skeleton.param_shapes["layers/self_attn/q_proj/lora_a"] == (2, 16, 4)  # [layers, in, rank]
    else:
        assert adapters == [f"layers/{i}/self_attn/q_proj/lora_{ab}" for i in (0, 1) for ab in "ab"]
    assert setup.stacked_layers(skeleton) is scan
    assert skeleton.lora == LoraSpec(4, 16.0, 0.0, (r".*q_proj",))


# ------------------------------------------------------------------------------------------------ freeze


def test_freeze_plan_that_freezes_the_embeddings(tiny_bert):
    cfg = config(tiny_bert)
    skeleton = setup.build_model(cfg, setup.build_mesh(cfg))
    plan = setup.build_freeze_plan(skeleton, cfg)
    embeddings = {p for p in skeleton.param_shapes if p.startswith("embeddings/")}
    assert plan.frozen_paths == embeddings and len(embeddings) == 5
    assert set(plan.trainable_paths) == set(skeleton.param_shapes) - embeddings
    layout = setup.abstract_state(
        skeleton, plan, frozenset(plan.trainable_paths), cfg, optim.build_schedule(cfg.optim, 10)
    )
    assert set(paths_of(layout.abstract.frozen)) == embeddings
    assert set(paths_of(layout.abstract.trainable)) == set(plan.trainable_paths)
    assert layout.trainable_paths == frozenset(plan.trainable_paths)
    # leaf_paths name the trainable leaves in jax.tree.leaves order (the step reports a bad gradient by index).
    names = list(layout.leaf_paths)
    assert sorted(names) == sorted(plan.trainable_paths)
    leaves = jax.tree.leaves(layout.abstract.trainable)
    assert [skeleton.param_shapes[n] for n in names] == [x.shape for x in leaves]
    # Adam's mu and nu hold the trainable parameters only.
    mu, nu = layout.abstract.opt_state[1][0].mu, layout.abstract.opt_state[1][0].nu
    assert set(paths_of(mu)) == set(paths_of(nu)) == set(plan.trainable_paths)
    opt_elements = sum(x.size for x in jax.tree.leaves(layout.abstract.opt_state) if x.ndim > 0)
    assert opt_elements == 2 * plan.count(True)
    assert plan.count(False) == 30522 * 32 + 128 * 32 + 2 * 32 + 2 * 32


def test_frozen_new_params_need_saved_frozen_weights(tiny_bert):
    rules = ((r"classifier/.*", "freeze"), (r".*", "train"))
    cfg = config(tiny_bert, rules=rules, checkpoint=CheckpointConfig(save_frozen=False))
    skeleton = setup.build_model(cfg, setup.build_mesh(cfg))
    with pytest.raises(ConfigError, match=r"save_frozen=false: frozen parameter classifier/bias is on load.new_params"):
        setup.build_freeze_plan(skeleton, cfg)
    plan = setup.build_freeze_plan(skeleton, cfg.replace(checkpoint=CheckpointConfig(save_frozen=True)))
    assert plan.frozen_paths == {"classifier/bias", "classifier/kernel"}


def test_gradual_unfreezing_refuses_stacked_layers():
    cfg = Config(mesh=MeshConfig(data=8), freeze=FreezeConfig(unfreeze_every_steps=5))
    mesh = setup.build_mesh(cfg)
    for scan in (True, False):
        skeleton = setup.skeleton_of(dataclasses.replace(TINY_LLAMA, scan_layers=scan), cfg, mesh)
        plan = setup.build_freeze_plan(skeleton, cfg)
        if scan:
            with pytest.raises(ConfigError, match="gradual unfreezing needs one tensor per layer"):
                setup.build_phases(skeleton, plan, cfg)
        else:
            phases = setup.build_phases(skeleton, plan, cfg)
            assert phases.groups[0] == ("lm_head/kernel", "norm/scale")
            assert all(p.startswith("layers/1/") for p in phases.groups[1])


# ------------------------------------------------------------------------------------------------- state


def assert_layout_is_the_state(layout: setup.StateLayout, state) -> None:
    """Leaf by leaf: the created state has the layout's tree, shapes, dtypes and shardings."""
    abstract, shardings = jax.tree_util.tree_flatten_with_path(layout.abstract)
    assert jax.tree.structure(state) == shardings  # the same tree
    assert jax.tree.structure(layout.shardings) == shardings
    for (path, want), sh, have in zip(abstract, jax.tree.leaves(layout.shardings), jax.tree.leaves(state)):
        name = jax.tree_util.keystr(path)
        assert isinstance(want, jax.ShapeDtypeStruct), name
        assert isinstance(sh, NamedSharding), name
        assert have.shape == want.shape, name
        assert have.dtype == want.dtype, name
        assert have.sharding.spec == sh.spec, name
        assert have.sharding.mesh == sh.mesh, name


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_abstract_state_is_the_created_state(tiny_bert, optimizer):
    cfg = config(tiny_bert, optim=OptimConfig(name=optimizer, warmup_steps=0))
    created = setup.build_train_setup(cfg, num_labels=2)
    assert_layout_is_the_state(created.layout, created.state)
    # An abstract state built apart from the setup (as a restore builds it) is the same one.
    skeleton = setup.build_model(cfg, setup.build_mesh(cfg), 2)
    plan = setup.build_freeze_plan(skeleton, cfg)
    trainable = setup.build_phases(skeleton, plan, cfg).phase_at(0).trainable_paths
    again = setup.abstract_state(skeleton, plan, trainable, cfg, optim.build_schedule(cfg.optim, 10))
    assert_layout_is_the_state(again, created.state)
    assert again.trainable_paths == created.layout.trainable_paths
    assert again.leaf_paths == created.layout.leaf_paths


def test_abstract_state_specs_put_parameters_and_their_statistics_together(tiny_bert):
    created = setup.build_train_setup(config(tiny_bert))
    layout, skeleton = created.layout, created.skeleton
    expected = skeleton.param_shardings["encoder/layers/0/up/kernel"]
    assert expected.spec == PartitionSpec("fsdp", "tensor")
    adam = layout.shardings.opt_state[1][0]
    for tree in (layout.shardings.trainable, adam.mu, adam.nu):
        assert tree["encoder"]["layers"][0]["up"]["kernel"].get_value() == expected
    assert layout.shardings.frozen["embeddings"]["word"]["embedding"].get_value() == NamedSharding(
        created.mesh, PartitionSpec("tensor", "fsdp")
    )
    replicated = NamedSharding(created.mesh, PartitionSpec())
    assert layout.shardings.step == replicated and layout.shardings.rng == replicated
    assert layout.abstract.step == jax.ShapeDtypeStruct((), jnp.int32)
    assert (layout.abstract.rng.shape, layout.abstract.rng.dtype) == ((2,), jnp.uint32)
    assert int(created.state.step) == 0


def test_abstract_state_with_a_frozen_bf16_base(tiny_bert):
    cfg = config(tiny_bert, model=ModelConfig(source=str(tiny_bert), frozen_dtype="bfloat16"))
    created = setup.build_train_setup(cfg)
    assert_layout_is_the_state(created.layout, created.state)
    assert {x.dtype for x in jax.tree.leaves(created.layout.abstract.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(created.layout.abstract.trainable)} == {jnp.dtype(jnp.float32)}


def test_abstract_state_of_adapters_only():
    cfg = Config(
        model=ModelConfig(task="causal-lm"),
        lora=LoraConfig(rank=4, targets=(r".*(q|v)_proj",)),
        mesh=MeshConfig(data=4, fsdp=2),
        freeze=FreezeConfig(rules=((ADAPTER_PARAMS, "train"), (r".*", "freeze"))),
        train=TrainConfig(batch_size=8, eval_batch_size=8, max_steps=10),
    )
    mesh = setup.build_mesh(cfg)
    skeleton = setup.skeleton_of(TINY_LLAMA, cfg, mesh)
    created = setup.build_train_setup(cfg, skeleton=skeleton, params=setup.init_weights(skeleton, "float32"))
    assert_layout_is_the_state(created.layout, created.state)
    adapters = sorted(f"layers/self_attn/{m}_proj/lora_{ab}" for m in "qv" for ab in "ab")
    assert sorted(created.layout.leaf_paths) == adapters
    assert sorted(paths_of(created.state.trainable)) == adapters
    adam = created.state.opt_state[1][0]
    assert sorted(paths_of(adam.mu)) == adapters
    # B starts at zero, A does not.
    np.testing.assert_array_equal(
        np.asarray(created.state.trainable["layers"]["self_attn"]["q_proj"]["lora_b"].get_value()), 0
    )
    assert np.abs(np.asarray(created.state.trainable["layers"]["self_attn"]["q_proj"]["lora_a"].get_value())).max() > 0


def test_compute_dtype_auto_is_fp32_on_cpu_and_explicit_dtypes_stay():
    import jax.numpy as jnp

    from jaxft.config import MeshConfig, ModelConfig
    from jaxft.mesh import build_mesh
    from jaxft.setup import compute_dtype

    mesh = build_mesh(MeshConfig())
    assert compute_dtype(ModelConfig(), mesh) == jnp.float32  # "auto" on CPU devices
    assert compute_dtype(ModelConfig(compute_dtype="bfloat16"), mesh) == jnp.bfloat16
    assert compute_dtype(ModelConfig(compute_dtype="float32"), mesh) == jnp.float32
