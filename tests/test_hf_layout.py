"""The HF tensor layouts: each Kind's HF shape and reshapes (exact transposes, exact round trips), HFEntry over one
key and over stacked layers (whole and one block at a time), the table lookups shared by the families, and
KeyRenames for old checkpoint names and legacy Flax leaves."""

import numpy as np
import pytest

from jaxft.models.hf_layout import (
    HF_FLAX_LEAVES,
    TASK_CLASS_SUFFIXES,
    HFEntry,
    KeyRenames,
    Kind,
    lookup,
    match_entry,
)


def arange(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


# (kind, jaxft shape, HF shape, input dims, is_matrix, layer_type)
KINDS = [
    (Kind.COPY, (2, 3), (2, 3), 0, False, ""),
    (Kind.FLAT, (2, 3), (6,), 0, False, ""),
    (Kind.LINEAR1, (3, 2, 4), (8, 3), 1, True, "linear"),  # [in, N, H] <- [N*H, in]
    (Kind.LINEAR2, (2, 3, 4), (4, 6), 2, True, "linear"),  # [N, H, E] <- [E, N*H]
    (Kind.CONV1, (3, 2, 4), (3, 8), 1, True, "conv"),  # [in, N, H] <- [in, N*H]
    (Kind.CONV2, (2, 3, 4), (6, 4), 2, True, "conv"),  # [N, H, E] <- [N*H, E]
]


@pytest.mark.parametrize("kind, shape, hf_shape, input_dims, is_matrix, layer_type", KINDS)
def test_kind_properties_and_hf_shape(kind, shape, hf_shape, input_dims, is_matrix, layer_type):
    assert kind.hf_shape(shape) == hf_shape
    assert kind.input_dims == input_dims
    assert kind.is_matrix is is_matrix
    assert kind.layer_type == layer_type


@pytest.mark.parametrize("kind, shape, hf_shape", [k[:3] for k in KINDS])
def test_round_trips_are_exact(kind, shape, hf_shape):
    hf = arange(*hf_shape) * 0.5 - 3.0
    param = kind.to_jaxft(hf, shape)
    assert param.shape == shape
    back = kind.to_hf(param)
    assert back.shape == hf_shape
    np.testing.assert_array_equal(back, hf)
    np.testing.assert_array_equal(kind.to_jaxft(kind.to_hf(param), shape), param)


def test_copy_and_flat_reshape_without_reordering():
    hf = arange(2, 3)
    np.testing.assert_array_equal(Kind.COPY.to_jaxft(hf, (2, 3)), hf)
    np.testing.assert_array_equal(Kind.FLAT.to_jaxft(arange(6), (2, 3)), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(Kind.FLAT.to_hf(arange(2, 3)), [0, 1, 2, 3, 4, 5])


def test_linear_kinds_transpose_torch_weights():
    weight = arange(8, 3)  # torch Linear(3 -> 8): [out, in]
    kernel = Kind.LINEAR1.to_jaxft(weight, (3, 2, 4))
    np.testing.assert_array_equal(kernel, weight.T.reshape(3, 2, 4))
    assert kernel[1, 1, 2] == weight[6, 1]  # out index 1*4+2 = 6, in index 1
    assert kernel.flags["C_CONTIGUOUS"]
    out = arange(4, 6)  # attention output: weight [E, N*H]
    kernel2 = Kind.LINEAR2.to_jaxft(out, (2, 3, 4))
    np.testing.assert_array_equal(kernel2, out.T.reshape(2, 3, 4))
    assert kernel2[1, 2, 3] == out[3, 5]  # in index 1*3+2 = 5, out index 3
    np.testing.assert_array_equal(Kind.LINEAR2.to_hf(kernel2), out)


def test_conv_kinds_reshape_without_transposing():
    weight = arange(3, 8)  # GPT-2 Conv1D: already [in, out]
    np.testing.assert_array_equal(Kind.CONV1.to_jaxft(weight, (3, 2, 4)), weight.reshape(3, 2, 4))
    proj = arange(6, 4)
    np.testing.assert_array_equal(Kind.CONV2.to_jaxft(proj, (2, 3, 4)), proj.reshape(2, 3, 4))
    np.testing.assert_array_equal(Kind.CONV2.to_hf(proj.reshape(2, 3, 4)), proj)


def test_entry_of_one_key():
    entry = HFEntry(("dense.weight",), Kind.LINEAR1, False)
    weight = arange(4, 3)
    assert entry.hf_shape((3, 4)) == (4, 3)
    np.testing.assert_array_equal(entry.to_jaxft([weight], (3, 4)), weight.T)
    out = entry.to_hf(weight.T)
    assert list(out) == ["dense.weight"]
    np.testing.assert_array_equal(out["dense.weight"], weight)


def test_stacked_entry_stacks_and_unstacks_layers():
    keys = ("h.0.w", "h.1.w", "h.2.w")
    entry = HFEntry(keys, Kind.LINEAR1, True)
    layers = [arange(4, 3) + 100 * i for i in range(3)]
    assert entry.hf_shape((3, 3, 4)) == (4, 3)  # the leading layers axis is not in any one tensor
    stacked = entry.to_jaxft(layers, (3, 3, 4))
    assert stacked.shape == (3, 3, 4)
    for i in range(3):
        np.testing.assert_array_equal(stacked[i], layers[i].T)
    out = entry.to_hf(stacked)
    assert list(out) == list(keys)
    for key, layer in zip(keys, layers):
        np.testing.assert_array_equal(out[key], layer)


def test_stacked_block_reads_only_the_layers_it_covers():
    keys = tuple(f"h.{i}.w" for i in range(4))
    tensors = {k: arange(4, 3) + 100 * i for i, k in enumerate(keys)}
    entry = HFEntry(keys, Kind.LINEAR1, True)
    whole = entry.to_jaxft([tensors[k] for k in keys], (4, 3, 4))
    read = []

    def reader(key):
        read.append(key)
        return tensors[key]

    block = entry.to_jaxft_block(reader, (4, 3, 4), (slice(1, 3), slice(0, 2)))
    assert read == ["h.1.w", "h.2.w"]
    np.testing.assert_array_equal(block, whole[1:3, 0:2])
    read.clear()
    np.testing.assert_array_equal(entry.to_jaxft_block(reader, (4, 3, 4), (slice(3, 4),)), whole[3:4])
    assert read == ["h.3.w"]


def test_unstacked_block_is_a_slice_of_the_whole():
    weight = arange(4, 3)
    entry = HFEntry(("w",), Kind.LINEAR1, False)
    block = entry.to_jaxft_block(lambda key: weight, (3, 4), (slice(1, 3), slice(2, 4)))
    np.testing.assert_array_equal(block, weight.T[1:3, 2:4])


TABLE = (
    (r"embed", "embed.weight", Kind.COPY),
    (r"blocks/(\d+)/(q|k)/kernel", "block.{0}.attn.{1}.weight", Kind.LINEAR1),
    (r"blocks/(\d+)/.*", "block.{0}.catch_all", Kind.COPY),
)


def test_lookup_formats_the_first_matching_row_under_the_prefix():
    assert lookup("embed", TABLE) == HFEntry(("embed.weight",), Kind.COPY, False)
    assert lookup("blocks/3/k/kernel", TABLE, "bert.") == HFEntry(("bert.block.3.attn.k.weight",), Kind.LINEAR1, False)
    # First match wins: the catch-all row only takes what the earlier rows did not.
    assert lookup("blocks/3/v/kernel", TABLE) == HFEntry(("block.3.catch_all",), Kind.COPY, False)


@pytest.mark.parametrize("path", ["embed/extra", "xembed", "blocks/x/q/kernel", ""])
def test_lookup_needs_a_full_match(path):
    assert lookup(path, TABLE) is None


GLOBAL = ((r"wte", "wte.weight", Kind.COPY), (r"ln_f/scale", "ln_f.weight", Kind.COPY))
LAYER = ((r"mlp/kernel", "mlp.weight", Kind.CONV1), (r"(ln_1|ln_2)/scale", "{0}.weight", Kind.COPY))


def test_match_entry_global_rows_carry_the_prefix():
    assert match_entry("wte", 3, GLOBAL, LAYER, "h.{}.", "transformer.") == HFEntry(
        ("transformer.wte.weight",), Kind.COPY, False
    )


def test_match_entry_one_layer_and_stacked_layers():
    one = match_entry("layers/2/ln_2/scale", 3, GLOBAL, LAYER, "h.{}.", "transformer.")
    assert one == HFEntry(("transformer.h.2.ln_2.weight",), Kind.COPY, False)
    stacked = match_entry("layers/mlp/kernel", 3, GLOBAL, LAYER, "model.layers.{}.")
    assert stacked == HFEntry(
        ("model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.layers.2.mlp.weight"), Kind.CONV1, True
    )


@pytest.mark.parametrize("path", ["layers/2/attn/kernel", "layers/attn/kernel", "wpe", "layers", "blocks/0/mlp/kernel"])
def test_match_entry_misses_are_none(path):
    assert match_entry(path, 3, GLOBAL, LAYER, "h.{}.") is None


def test_key_renames_suffixes():
    renames = KeyRenames(suffixes=((".gamma", ".weight"), (".beta", ".bias")))
    assert renames.key("bert.embeddings.LayerNorm.gamma") == "bert.embeddings.LayerNorm.weight"
    assert renames.key("bert.embeddings.LayerNorm.beta") == "bert.embeddings.LayerNorm.bias"
    assert renames.key("bert.pooler.dense.weight") == "bert.pooler.dense.weight"
    assert renames.key("gamma_not_a_suffix.x") == "gamma_not_a_suffix.x"
    assert KeyRenames().key("a.gamma") == "a.gamma"


def test_key_renames_flax_leaves():
    renames = KeyRenames(flax_leaves=HF_FLAX_LEAVES)
    kernel = arange(3, 4)
    key, tensor = renames.flax_leaf(["bert", "pooler", "dense", "kernel"], kernel)
    assert key == "bert.pooler.dense.weight"
    np.testing.assert_array_equal(tensor, kernel.T)  # Flax [in, out] -> torch [out, in]
    assert tensor.flags["C_CONTIGUOUS"]
    scale = arange(4)
    key, tensor = renames.flax_leaf(["bert", "embeddings", "LayerNorm", "scale"], scale)
    assert key == "bert.embeddings.LayerNorm.weight"
    assert tensor is scale
    table = arange(5, 4)
    key, tensor = renames.flax_leaf(["bert", "embeddings", "word_embeddings", "embedding"], table)
    assert key == "bert.embeddings.word_embeddings.weight"
    np.testing.assert_array_equal(tensor, table)  # embedding tables are not transposed
    key, tensor = renames.flax_leaf(["bert", "pooler", "dense", "bias"], scale)
    assert (key, tensor is scale) == ("bert.pooler.dense.bias", True)


def test_task_class_suffixes():
    assert TASK_CLASS_SUFFIXES == {
        "sequence-classification": "ForSequenceClassification",
        "token-classification": "ForTokenClassification",
        "causal-lm": "ForCausalLM",
        "image-classification": "ForImageClassification",
    }
