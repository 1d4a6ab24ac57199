"""The shared layers: Linear (bias or not, with a LoRA adapter, its dropout), Dense, LayerNorm and RMSNorm against
their numpy formulas, the activation table against jax.nn, inverted dropout (identity when off, exact survivor
scale, a plausible drop fraction), key splitting, remat names, the init, Embed, layer stacking, and matmul (fp32
accumulation, a backward pass in the compute dtype) against numpy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import axes
from jaxft.models.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
    Adapter,
    Dense,
    Embed,
    LayerNorm,
    Linear,
    RMSNorm,
    build_stacked,
    dropout,
    matmul,
    normal_init,
    remat_name,
    split_key,
)


def ints(shape, seed, low=-3, high=4) -> np.ndarray:
    """Small integers as fp32: every product and sum below is exact, so results compare bit for bit."""
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.float32)


def linear(in_shape, out_shape, bias: bool) -> Linear:
    in_axes = (axes.EMBED,) + (None,) * (len(in_shape) - 1)
    out_axes = (axes.MLP,) + (None,) * (len(out_shape) - 1)
    layer = Linear(in_shape, out_shape, in_axes, out_axes, bias=bias, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(ints(tuple(in_shape) + tuple(out_shape), 1))
    if bias:
        layer.bias[...] = jnp.asarray(ints(out_shape, 2))
    return layer


def with_adapter(layer: Linear, rank: int, scale: float, rate: float) -> Linear:
    in_shape = layer.kernel.shape[: layer.n_in]
    out_shape = layer.kernel.shape[layer.n_in :]
    layer.lora_a = nnx.Param(jnp.asarray(ints(in_shape + (rank,), 3)))
    layer.lora_b = nnx.Param(jnp.asarray(ints((rank,) + out_shape, 4)))
    layer.adapter = Adapter(scale=scale, dropout=rate)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_x_w_plus_b(bias):
    layer = linear((5,), (3,), bias)
    x = ints((2, 4, 5), 0)
    w = np.asarray(layer.kernel[...])
    expected = x @ w + (np.asarray(layer.bias[...]) if bias else 0.0)
    y = layer(jnp.asarray(x), jnp.float32)
    assert y.shape == (2, 4, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert (layer.bias is None) is (not bias)


def test_linear_contracts_several_input_dims_into_several_output_dims():
    layer = linear((2, 3), (4, 2), bias=True)  # kernel [2, 3, 4, 2]
    x = ints((5, 2, 3), 0)
    w = np.asarray(layer.kernel[...])
    expected = np.einsum("bij,ijkl->bkl", x, w) + np.asarray(layer.bias[...])
    y = layer(jnp.asarray(x), jnp.float32)
    assert y.shape == (5, 4, 2)
    np.testing.assert_array_equal(np.asarray(y), expected)


def test_linear_returns_the_compute_dtype():
    layer = linear((4,), (3,), bias=True)
    x = ints((2, 4), 0)
    y = layer(jnp.asarray(x), jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    # Small integers are exact in bf16 too.
    np.testing.assert_array_equal(np.asarray(y, np.float32), x @ np.asarray(layer.kernel[...]) + layer.bias[...])


def test_linear_with_an_adapter_adds_the_scaled_low_rank_delta():
    layer = with_adapter(linear((5,), (3,), bias=True), rank=2, scale=0.5, rate=0.0)
    x = ints((2, 4, 5), 0)
    w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    a, bb = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    expected = x @ w + 0.5 * (x @ a @ bb) + b
    assert not np.array_equal(expected, x @ w + b)  # the delta is not zero
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x), jnp.float32)), expected)


def test_linear_adapter_over_two_input_dims():
    layer = with_adapter(linear((2, 3), (4,), bias=False), rank=3, scale=2.0, rate=0.0)  # A [2, 3, r], B [r, 4]
    x = ints((5, 2, 3), 0)
    x2 = x.reshape(5, 6)
    w = np.asarray(layer.kernel[...]).reshape(6, 4)
    a, bb = np.asarray(layer.lora_a[...]).reshape(6, 3), np.asarray(layer.lora_b[...])
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x), jnp.float32)), x2 @ w + 2.0 * (x2 @ a @ bb))


def test_adapter_dropout_applies_to_the_adapter_input_only_and_only_with_a_key():
    layer = with_adapter(linear((5,), (3,), bias=True), rank=2, scale=0.5, rate=0.5)
    x = ints((4, 5), 0, low=1, high=4)  # no zeros, so a dropped input is visible
    w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    a, bb = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    no_key = np.asarray(layer(jnp.asarray(x), jnp.float32))
    np.testing.assert_array_equal(no_key, x @ w + 0.5 * (x @ a @ bb) + b)
    rng = jax.random.key(7)
    dropped = np.asarray(dropout(jnp.asarray(x), 0.5, rng))
    assert 0 < (dropped == 0).sum() < dropped.size
    with_key = np.asarray(layer(jnp.asarray(x), jnp.float32, rng))
    np.testing.assert_array_equal(with_key, x @ w + 0.5 * (dropped @ a @ bb) + b)


def test_linear_without_adapter_ignores_the_key():
    layer = linear((5,), (3,), bias=True)
    x = jnp.asarray(ints((4, 5), 0))
    np.testing.assert_array_equal(
        np.asarray(layer(x, jnp.float32, jax.random.key(0))), np.asarray(layer(x, jnp.float32))
    )


def test_linear_parameters_carry_logical_axes():
    layer = Linear((4,), (2, 3), (axes.EMBED,), (axes.HEADS, axes.KV), bias=True, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (4, 2, 3)
    assert layer.kernel.get_metadata()["logical_axes"] == (axes.EMBED, axes.HEADS, axes.KV)
    assert layer.bias.get_metadata()["logical_axes"] == (axes.HEADS, axes.KV)
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), np.zeros((2, 3)))
    assert layer.adapter is None and layer.lora_a is None and layer.lora_b is None


def test_dense_is_x_w_plus_b():
    layer = Dense((2, 3), (4,), (axes.HEADS, axes.KV), (axes.EMBED,), rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(ints((2, 3, 4), 1))
    layer.bias[...] = jnp.asarray(ints((4,), 2))
    x = ints((5, 2, 3), 0)
    expected = x.reshape(5, 6) @ np.asarray(layer.kernel[...]).reshape(6, 4) + np.asarray(layer.bias[...])
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x), jnp.float32)), expected)


def test_layer_norm_matches_the_formula():
    rng = np.random.default_rng(0)
    norm = LayerNorm(6, 1e-5)
    scale, bias = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    norm.scale[...], norm.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    x = rng.normal(3.0, 2.0, (2, 3, 6)).astype(np.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    y = norm(jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_keeps_the_input_dtype_and_starts_as_plain_standardisation():
    norm = LayerNorm(4, 1e-6)
    np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.ones(4))
    np.testing.assert_array_equal(np.asarray(norm.bias[...]), np.zeros(4))
    x = jnp.asarray([[1.0, 2.0, 3.0, 6.0]], jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    xs = np.array([1.0, 2.0, 3.0, 6.0])
    expected = (xs - 3.0) / np.sqrt(xs.var() + 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32)[0], expected, rtol=1e-2)


@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_matches_the_formula(offset):
    rng = np.random.default_rng(1)
    norm = RMSNorm(6, 1e-6, offset=offset)
    initial = np.asarray(norm.scale[...])
    np.testing.assert_array_equal(initial, np.zeros(6) if offset else np.ones(6))
    scale = rng.normal(size=6).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    expected = normed * ((1.0 + scale) if offset else scale)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_with_offset_starts_as_plain_rms_normalisation():
    x = jnp.asarray([[3.0, 4.0]])  # rms 3.5355
    y = np.asarray(RMSNorm(2, 0.0, offset=True)(x))
    np.testing.assert_allclose(y, [[3.0 / np.sqrt(12.5), 4.0 / np.sqrt(12.5)]], rtol=1e-6)


X = jnp.linspace(-4.0, 4.0, 33)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("gelu", lambda x: jax.nn.gelu(x, approximate=False)),
        ("gelu_new", lambda x: jax.nn.gelu(x, approximate=True)),
        ("gelu_pytorch_tanh", lambda x: jax.nn.gelu(x, approximate=True)),
        ("relu", jax.nn.relu),
        ("silu", jax.nn.silu),
    ],
)
def test_activations_are_the_jax_functions(name, reference):
    np.testing.assert_array_equal(np.asarray(ACTIVATIONS[name](X)), np.asarray(reference(X)))


def test_activation_table_names_and_gelu_variants_differ():
    assert set(ACTIVATIONS) == {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}
    # The exact erf gelu is not the tanh approximation (a swap would pass the table test above only by luck).
    assert not np.array_equal(np.asarray(ACTIVATIONS["gelu"](X)), np.asarray(ACTIVATIONS["gelu_new"](X)))


@pytest.mark.parametrize(
    "value, name", [(True, "full"), (False, "none"), ("none", "none"), ("dots_saveable", "dots_saveable")]
)
def test_remat_name(value, name):
    assert remat_name(value) == name


def test_remat_name_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match=r"remat 'everything' is not one of: none, full, dots_saveable"):
        remat_name("everything")
    assert REMAT_POLICIES["full"] is None


def test_dropout_is_identity_without_a_key_or_at_rate_zero():
    x = jnp.asarray(ints((4, 8), 0))
    assert dropout(x, 0.5, None) is x
    assert dropout(x, 0.0, jax.random.key(0)) is x


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_dropout_zeroes_a_plausible_fraction_and_scales_survivors_exactly(rate):
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (200, 500)).astype(np.float32))
    y = np.asarray(dropout(x, rate, jax.random.key(3)))
    kept = y != 0
    # 100,000 draws: the fraction is within 5 standard deviations (~0.007) of the rate.
    assert abs((1.0 - kept.mean()) - rate) < 0.007
    np.testing.assert_array_equal(y[kept], np.asarray(x)[kept] * np.float32(1.0 / (1.0 - rate)))


def test_dropout_quantises_the_keep_probability_to_256ths():
    # Rate 0.1 keeps round(0.9 * 256) = 230 of 256 byte values: survivors are scaled by 256/230, not 1/0.9.
    x = jnp.ones((100, 100))
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    np.testing.assert_array_equal(np.unique(y), np.array([0.0, 256 / 230], np.float32))


def test_dropout_depends_on_the_key_only():
    x = jnp.ones((64, 64), jnp.bfloat16)
    a = np.asarray(dropout(x, 0.5, jax.random.key(1)), np.float32)
    b = np.asarray(dropout(x, 0.5, jax.random.key(1)), np.float32)
    c = np.asarray(dropout(x, 0.5, jax.random.key(2)), np.float32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert dropout(x, 0.5, jax.random.key(1)).dtype == jnp.bfloat16


def test_split_key():
    assert split_key(None, 3) == [None, None, None]
    rng = jax.random.key(5)
    keys = split_key(rng, 3)
    assert len(keys) == 3
    expected = jax.random.split(rng, 3)
    for k, e in zip(keys, expected):
        np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(e))
    assert not np.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(keys[1]))


def test_normal_init_draws_from_n_0_002():
    w = np.asarray(normal_init(nnx.Rngs(0), (200, 200), jnp.float32))
    assert w.shape == (200, 200) and w.dtype == np.float32
    assert abs(w.std() - 0.02) < 0.0005  # 40,000 draws: the std's std is ~0.00007
    assert abs(w.mean()) < 0.0005
    np.testing.assert_array_equal(w, np.asarray(normal_init(nnx.Rngs(0), (200, 200), jnp.float32)))


def test_embed_looks_up_rows():
    embed = Embed(5, 3, axes.VOCAB, rngs=nnx.Rngs(0))
    table = np.asarray(embed.embedding[...])
    assert table.shape == (5, 3)
    assert embed.embedding.get_metadata()["logical_axes"] == (axes.VOCAB, axes.EMBED)
    ids = jnp.asarray([[4, 0], [2, 2]])
    np.testing.assert_array_equal(np.asarray(embed(ids)), table[[[4, 0], [2, 2]]])


def test_build_stacked_adds_a_leading_layers_axis():
    make = lambda rngs: Linear((3,), (4,), (axes.EMBED,), (axes.MLP,), bias=True, rngs=rngs)
    stacked = build_stacked(make, 5, nnx.Rngs(0))
    assert stacked.kernel.shape == (5, 3, 4)
    assert stacked.bias.shape == (5, 4)
    assert stacked.kernel.get_metadata()["logical_axes"] == (axes.LAYERS, axes.EMBED, axes.MLP)
    assert stacked.bias.get_metadata()["logical_axes"] == (axes.LAYERS, axes.MLP)
    kernels = np.asarray(stacked.kernel[...])
    # Each layer draws its own init.
    assert len({kernels[i].tobytes() for i in range(5)}) == 5


# ------------------------------------------------------------------------------------------------ matmul


def matmul_case(T, K, N, w_contract, seed=0):
    """Small-integer x [T, K], w ([K, N] or [N, K]) and cotangent [T, N]: exact in bf16 and in fp32 sums."""
    w_shape = (K, N) if w_contract == 0 else (N, K)
    return ints((T, K), seed), ints(w_shape, seed + 1), ints((T, N), seed + 2)


def matmul_grads(x, w, g, compute_dtype, w_contract):
    """(value, dx, dw) of layers.matmul with cotangent g, jitted (so XLA:CPU's bf16 dot path is the one run)."""

    def loss(x, w):
        y = matmul(x, w, compute_dtype, w_contract)
        return jnp.sum(y * g), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(jnp.asarray(x), jnp.asarray(w))
    return y, dx, dw


@pytest.mark.parametrize("w_contract", [0, 1])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
# K < N, K > N, K = N, large enough for XLA:CPU's library dots; then degenerate ones (its other dot emitters)
@pytest.mark.parametrize(
    "shape", [(64, 32, 96), (64, 96, 32), (40, 48, 48), (1, 16, 24), (16, 1, 24), (16, 24, 1), (3, 5, 2)]
)
def test_matmul_and_both_gradients_are_exact(shape, compute_dtype, w_contract):
    """The value and both gradients against numpy in either dtype and each weight orientation (in bf16 on XLA:CPU:
    the weight gradient's four transposed-by-identity paths); dx comes back in x's dtype, dw in w's (fp32)."""
    T, K, N = shape
    x, w, g = matmul_case(T, K, N, w_contract)
    w_KxN = w if w_contract == 0 else w.T
    y, dx, dw = matmul_grads(x.astype(compute_dtype), w, g, compute_dtype, w_contract)
    assert y.dtype == jnp.float32 and dx.dtype == compute_dtype and dw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), x @ w_KxN)
    # dx is exact in fp32, then rounded once to x's dtype
    np.testing.assert_array_equal(np.asarray(dx), (g @ w_KxN.T).astype(compute_dtype))
    expected_dw = x.T @ g
    np.testing.assert_array_equal(np.asarray(dw), expected_dw if w_contract == 0 else expected_dw.T)


def test_matmul_weight_gradient_is_not_rounded_to_the_compute_dtype():
    """A bf16 matmul's fp32 weight gradient keeps what bf16 cannot hold (257 needs 9 significant bits): it comes
    straight from the fp32 accumulator, where a cast of the weight before the dot would round it to 256."""
    x = np.ones((257, 1), np.float32)
    w = np.ones((1, 1), np.float32)
    _, _, dw = matmul_grads(x.astype(jnp.bfloat16), w, np.ones((257, 1), np.float32), jnp.bfloat16, 0)
    assert float(dw[0, 0]) == 257.0
    plain = jax.grad(lambda w: jnp.sum(jnp.matmul(jnp.asarray(x, jnp.bfloat16), w.astype(jnp.bfloat16))))
    assert float(plain(jnp.asarray(w))[0, 0]) == 256.0  # what the plain cast gives


def test_bf16_matmul_backward_runs_its_dots_in_bf16():
    """Every dot of a bf16 matmul's jitted value and gradients takes bf16 operands: none is run in fp32 (JAX's own
    transpose of an fp32-accumulating dot takes the fp32 cotangent into the input gradient's dot, and XLA:CPU
    converts the weight gradient's x^T g to fp32 unless its transposed operand is made first)."""
    T, K, N = 64, 32, 48
    x, w, g = matmul_case(T, K, N, 0)

    def loss(x, w):
        return jnp.sum(matmul(x, w, jnp.bfloat16).astype(jnp.bfloat16).astype(jnp.float32) * g)

    args = (jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().as_text()
    dtype_of = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    dots = re.findall(r"= \S+ dot\(%([^,\s]+), %([^,\s)]+)\)", hlo)
    assert len(dots) >= 3, hlo
    assert {(dtype_of[a], dtype_of[b]) for a, b in dots} == {("bf16", "bf16")}, dots


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_that_save_dots_save_matmul_results(policy, capsys):
    """A remat policy sees matmul's custom VJP as one call, not a dot: the policies that keep dots keep its named
    result too (else they recompute every projection in the backward pass, as "full" does)."""
    from jax.ad_checkpoint import print_saved_residuals

    def f(x, w1, w2):
        h = jnp.tanh(matmul(x, w1, jnp.float32))
        return jnp.sum(jnp.tanh(matmul(h, w2, jnp.float32)))

    args = (jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((32, 16)))
    print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES[policy]), *args)
    assert capsys.readouterr().out.count("named 'jaxft_matmul'") == 2
    print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES["full"]), *args)
    assert "jaxft_matmul" not in capsys.readouterr().out
