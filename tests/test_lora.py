"""LoRA on the decoders: adapters on exactly the targeted layers (scanned and per layer), an untrained adapter is
the base model, the base stays bit-identical while only adapters train (no optimizer state for the base), frozen
base weights kept in bf16, adapter dropout, folding an adapter into its kernel, and a target that matches
nothing."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import mesh, setup
from jaxft.config import Config, LoraConfig, MeshConfig, ModelConfig
from jaxft.models import lora
from jaxft.paths import RuleError, path_str
from jaxft.step import model_logits
from tests.fixtures import llama_family, make_setup, random_lm_batch, save_tiny_llama

LORA_ONLY = ((lora.ADAPTER_PARAMS, "train"), (r".*", "freeze"))
ATTENTION = LoraConfig(rank=4, alpha=8.0, targets=(r".*(q|v)_proj",))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    config, _ = llama_family("qwen2")  # biases and tied embeddings
    return save_tiny_llama(tmp_path_factory.mktemp("lora") / "qwen2", config)


@dataclasses.dataclass(frozen=True)
class Loaded:
    skeleton: setup.ModelSkeleton
    params: object

    @property
    def graphdef(self):
        return self.skeleton.graphdef


def load(folder: Path, scan: bool, lora_cfg: LoraConfig | None, **model_kwargs) -> Loaded:
    model_cfg = ModelConfig(source=str(folder), task="causal-lm", scan_layers=scan, **model_kwargs)
    cfg = Config(model=model_cfg, lora=lora_cfg or LoraConfig(), mesh=MeshConfig(data=4, fsdp=2))
    skeleton = setup.build_model(cfg, mesh.build_mesh(cfg.mesh))
    return Loaded(skeleton, setup.load_weights(skeleton, cfg.model, cfg.load))


def flat(state) -> dict[str, jax.Array]:
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("scan", [True, False])
def test_adapters_on_targets_only_and_untrained_adapter_is_the_base(tiny_llama, scan):
    base = load(tiny_llama, scan, None)
    adapted = load(tiny_llama, scan, ATTENTION)
    names = [p for p in flat(adapted.params) if "lora" in p]
    per_layer = ["layers/self_attn/q_proj", "layers/self_attn/v_proj"]
    if not scan:
        per_layer = [p.replace("layers/", f"layers/{i}/") for i in range(3) for p in per_layer]
    assert sorted(names) == sorted(f"{p}/lora_{ab}" for p in per_layer for ab in "ab")
    a = flat(adapted.params)[names[0].replace("lora_b", "lora_a")]
    if scan:
        assert a.shape == (3, 64, 4)  # [layers, in, rank]
    batch = random_lm_batch()
    ours = model_logits(adapted.graphdef, adapted.params, batch, None, "causal-lm")
    ref = model_logits(base.graphdef, base.params, batch, None, "causal-lm")
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))  # B starts at zero


def test_only_adapters_train_base_bit_identical(tiny_llama):
    setup = make_setup(tiny_llama, (4, 2, 1), rules=LORA_ONLY, task="causal-lm", lora=LoraConfig(rank=4, dropout=0.1))
    state, step = setup.state, setup.step
    before_frozen = jax.tree.map(np.asarray, flat(state.frozen))
    before_trainable = jax.tree.map(np.asarray, flat(state.trainable))
    assert set(before_trainable) == {p for p in before_trainable if p.endswith(("lora_a", "lora_b"))}
    # The optimizer holds state for the adapters only.
    n_adapter = sum(x.size for x in before_trainable.values())
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter  # adam's mu and nu
    losses = []
    for i in range(4):
        state, metrics = step(state, mesh.make_global_batch(random_lm_batch(seed=i % 2), setup.mesh))
        losses.append(float(metrics["loss"]))
    for k, v in flat(state.frozen).items():
        np.testing.assert_array_equal(np.asarray(v), before_frozen[k], err_msg=k)
    changed = [k for k, v in flat(state.trainable).items() if not np.array_equal(np.asarray(v), before_trainable[k])]
    assert sorted(changed) == sorted(before_trainable)
    assert step.traces == 1 and all(np.isfinite(losses))


def test_frozen_base_in_bf16_adapters_fp32(tiny_llama):
    pre = load(tiny_llama, True, ATTENTION)
    frozen = {p for p in flat(pre.params) if "lora" not in p}
    half_skeleton = setup.with_frozen_dtype(pre.skeleton, "bfloat16", frozen)
    dtypes = {path_str(p): v.get_value().dtype for p, v in nnx.to_flat_state(half_skeleton.abstract_params)}
    assert {dtypes[p] for p in frozen} == {jnp.dtype(jnp.bfloat16)}
    assert {d for p, d in dtypes.items() if p not in frozen} == {jnp.dtype(jnp.float32)}
    model_cfg = ModelConfig(source=str(tiny_llama), task="causal-lm")
    half = Loaded(half_skeleton, setup.load_weights(half_skeleton, model_cfg, Config().load))
    loaded = flat(half.params)
    assert (
        loaded["embed_tokens"].dtype == jnp.bfloat16 and loaded["layers/self_attn/q_proj/lora_a"].dtype == jnp.float32
    )
    logits = model_logits(half.graphdef, half.params, random_lm_batch(), None, "causal-lm")
    ref = model_logits(pre.graphdef, load(tiny_llama, True, ATTENTION).params, random_lm_batch(), None, "causal-lm")
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.05


def test_adapter_dropout_follows_the_rng(tiny_llama):
    pre = load(tiny_llama, True, LoraConfig(rank=4, dropout=0.5))
    # Non-zero B so the adapter path contributes.
    params = jax.tree.map(lambda x: x, pre.params)
    for p, v in nnx.to_flat_state(params):
        if path_str(p).endswith("lora_b"):
            v.set_value(jnp.full(v.shape, 0.1, v.dtype))
    batch = random_lm_batch()
    a, b, c = (np.asarray(model_logits(pre.graphdef, params, batch, jax.random.key(s), "causal-lm")) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    off = np.asarray(model_logits(pre.graphdef, params, batch, None, "causal-lm"))
    assert not np.array_equal(a, off)


def test_merged_kernel_equals_the_adapted_layer():
    rng = np.random.default_rng(0)
    kernel, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 2, 6), (4, 2, 3), (3, 6)))
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    merged = lora.merged_kernel(kernel, a, b, 0.5, n_in=2)
    expected = x @ kernel.reshape(8, 6) + 0.5 * (x @ a.reshape(8, 3)) @ b
    np.testing.assert_allclose(np.asarray(x @ merged.reshape(8, 6)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_target_that_matches_nothing_is_an_error(tiny_llama):
    with pytest.raises(RuleError, match=r"lora.targets: rule\(s\) matched no parameter: '.\*qkv_proj'"):
        load(tiny_llama, True, LoraConfig(rank=4, targets=(r".*q_proj", r".*qkv_proj")))


def test_plan_counts_only_adapters_as_trainable(tiny_llama):
    from jaxft.config import Config, FreezeConfig
    from jaxft.plan import describe_plan

    cfg = Config(
        model=ModelConfig(source=str(tiny_llama), task="causal-lm", scan_layers="true"),  # one row per stack
        lora=ATTENTION,
        freeze=FreezeConfig(rules=LORA_ONLY),
    )
    text = describe_plan(cfg)
    assert "layers/self_attn/q_proj/lora_a" in text
    n_adapter = 3 * ((64 * 4 + 4 * 64) + (64 * 4 + 4 * 32))  # layers × (q: 64 -> 64, v: 64 -> 2 kv heads × 16)
    assert f"trainable {n_adapter:,} /" in text
    # A bf16 frozen base: its rows say so, and the per-device params shrink while grads/optimizer stay.
    half = describe_plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, frozen_dtype="bfloat16")))
    row = lambda t, name: next(line for line in t.splitlines() if line.startswith(name + " "))
    assert "bfloat16" in row(half, "embed_tokens") and "float32" in row(half, "layers/self_attn/q_proj/lora_a")
    memory = lambda t, k: next(line for line in t.splitlines() if line.strip().startswith(k)).split(None, 1)[1]
    assert memory(half, "params") != memory(text, "params")
    assert memory(half, "optimizer") == memory(text, "optimizer")
