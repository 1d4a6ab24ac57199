"""The decoders' positions, masks and cache writes on tiny arrays, each against its exact expected array: positions
restarting per packed segment, segment/padding masks (no causality in them), the sliding-window band, the
left-padded kv-cache mask, cache positions, and writes into the cache."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.decoder import (
    cache_positions,
    make_attention_mask,
    make_band_mask,
    make_cache_mask,
    make_positions,
    write_cache,
)

T, F = True, False


def test_positions_count_per_row_without_segments():
    ids = jnp.zeros((2, 5), jnp.int32)
    np.testing.assert_array_equal(np.asarray(make_positions(ids, None)), [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])


def test_positions_restart_at_every_segment_change():
    ids = jnp.zeros((3, 6), jnp.int32)
    segments = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 1, 1, 3, 3]])
    np.testing.assert_array_equal(
        np.asarray(make_positions(ids, segments)),
        [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]],  # a returning id is a new segment
    )


def test_attention_mask_is_none_when_nothing_restricts():
    assert make_attention_mask(None, None) is None


def test_attention_mask_of_padding_masks_keys_only():
    mask = make_attention_mask(np.array([[1, 1, 0], [1, 0, 0]]), None)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask)[:, 0, 0], [[T, T, F], [T, F, F]])


def test_attention_mask_of_segments_is_not_causal():
    mask = make_attention_mask(None, np.array([[1, 1, 2, 2]]))
    assert mask.shape == (1, 1, 4, 4)
    # Causality comes from dot_product_attention's static flag: the future of a query's own segment is in here.
    np.testing.assert_array_equal(
        np.asarray(mask)[0, 0],
        [[T, T, F, F], [T, T, F, F], [F, F, T, T], [F, F, T, T]],
    )


def test_attention_mask_of_segments_and_padding():
    mask = make_attention_mask(np.array([[1, 1, 1, 0]]), np.array([[1, 2, 2, 0]]))
    np.testing.assert_array_equal(
        np.asarray(mask)[0, 0],
        [[T, F, F, F], [F, T, T, F], [F, T, T, F], [F, F, F, F]],  # padding attends to nothing, is never attended
    )


def test_band_mask_reaches_window_minus_one_keys_back():
    mask = make_band_mask(5, 2)
    assert mask.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(
        np.asarray(mask)[0, 0],
        [
            [T, T, T, T, T],
            [T, T, T, T, T],
            [F, T, T, T, T],
            [F, F, T, T, T],
            [F, F, F, T, T],
        ],
    )
    np.testing.assert_array_equal(np.asarray(make_band_mask(3, 1))[0, 0], [[T, T, T], [F, T, T], [F, F, T]])


def test_cache_mask_left_padded_rows():
    slots, start = jnp.asarray([2, 3]), jnp.asarray([0, 1])
    mask = make_cache_mask(slots, 4, start, None)
    assert mask.shape == (2, 1, 2, 4)
    np.testing.assert_array_equal(
        np.asarray(mask)[:, 0],
        [
            [[T, T, T, F], [T, T, T, T]],  # row 0 fills slots 0..; a query sees no later slot
            [[F, T, T, F], [F, T, T, T]],  # row 1 starts at slot 1
        ],
    )


def test_cache_mask_with_a_sliding_window():
    mask = make_cache_mask(jnp.asarray([2, 3]), 4, jnp.asarray([0, 1]), 2)
    np.testing.assert_array_equal(
        np.asarray(mask)[:, 0],
        [
            [[F, T, T, F], [F, F, T, T]],
            [[F, T, T, F], [F, F, T, T]],
        ],
    )


def test_cache_mask_padding_query_keeps_its_own_slot():
    # Row 0 starts at slot 3: its query at slot 1 is padding, and attends only to itself (no empty softmax row).
    mask = make_cache_mask(jnp.asarray([1, 3]), 4, jnp.asarray([3]), None)
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], [[F, T, F, F], [F, F, F, T]])


def test_cache_positions():
    np.testing.assert_array_equal(
        np.asarray(cache_positions(jnp.asarray([2, 3]), jnp.asarray([0, 1, 3]))),
        [[2, 3], [1, 2], [0, 0]],  # a slot before the row's start is clamped to 0
    )


def test_write_cache_writes_the_new_slots_only_in_the_cache_dtype():
    k = jnp.zeros((2, 5, 1, 2), jnp.bfloat16)
    v = jnp.full((2, 5, 1, 2), -1.0, jnp.bfloat16)
    new_k = jnp.asarray(np.arange(8, dtype=np.float32).reshape(2, 2, 1, 2) + 1)
    new_v = -new_k
    k2, v2 = write_cache((k, v), new_k, new_v, 2)
    assert k2.dtype == v2.dtype == jnp.bfloat16
    expected_k = np.zeros((2, 5, 1, 2), np.float32)
    expected_k[:, 2:4] = np.asarray(new_k)
    expected_v = np.full((2, 5, 1, 2), -1.0, np.float32)
    expected_v[:, 2:4] = -np.asarray(new_k)
    np.testing.assert_array_equal(np.asarray(k2, np.float32), expected_k)
    np.testing.assert_array_equal(np.asarray(v2, np.float32), expected_v)


def test_write_cache_at_a_traced_index():
    k = jnp.zeros((1, 4, 1, 1))
    new = jnp.ones((1, 1, 1, 1))
    k2, _ = jax.jit(lambda i: write_cache((k, k), new, new, i))(jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(k2)[0, :, 0, 0], [0, 0, 0, 1])
