"""The causal-LM loss with model.logits_chunk: the LM head runs a chunk of positions at a time under
jax.checkpoint, and loss, accuracy counts and gradients equal the all-at-once loss (chunks that do not divide the
sequence included), on a sharded mesh, through the real train step too."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft import compile, mesh
from jaxft import step as step_lib
from tests.fixtures import llama_family, make_setup, random_lm_batch, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config, _ = llama_family("llama")  # untied lm_head
    return save_tiny_llama(tmp_path_factory.mktemp("lm_loss") / "llama", config)


def _loss_and_grads(setup, batch, chunk):
    model = nnx.merge(setup.graphdef, nnx.merge_state(setup.state.trainable, setup.state.frozen))
    graphdef = nnx.split(model.configure(logits_chunk=chunk))[0]
    fn = jax.jit(jax.value_and_grad(step_lib._loss_of_trainable, has_aux=True), static_argnums=(2, 5))
    (loss, stats), grads = fn(setup.state.trainable, setup.state.frozen, graphdef, batch, None, "causal-lm")
    return float(loss), jax.device_get(stats), jax.device_get(grads)


def test_chunked_loss_and_grads_equal_the_whole(tiny):
    setup = make_setup(tiny, mesh_shape=(2, 2, 2), task="causal-lm")
    batch = random_lm_batch(batch=8, seq=12)
    loss, stats, grads = _loss_and_grads(setup, batch, 0)
    for chunk in (5, 4, 1):  # 11 target positions: 5 pads a chunk, 4 pads one too, 1 is the smallest
        c_loss, c_stats, c_grads = _loss_and_grads(setup, batch, chunk)
        np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
        assert c_stats["count"] == stats["count"] and c_stats["correct"] == stats["correct"]
        for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)):
            np.testing.assert_allclose(c, g, rtol=1e-4, atol=1e-7, err_msg=f"chunk {chunk} {path}")


def test_train_step_with_a_chunked_head_matches(tiny):
    batch = random_lm_batch(batch=8, seq=12, seed=3)
    losses = []
    for chunk in (0, 3):
        setup = make_setup(tiny, mesh_shape=(8, 1, 1), task="causal-lm")
        step = setup.step
        if chunk:
            model = nnx.merge(setup.graphdef, nnx.merge_state(setup.state.trainable, setup.state.frozen))
            graphdef = nnx.split(model.configure(logits_chunk=chunk))[0]
            step = compile.jit_train_step(
                graphdef, setup.tx, lambda s: 1e-3, 1, setup.layout.shardings, setup.mesh, "causal-lm"
            )
        state, history = setup.state, []
        for _ in range(3):
            state, metrics = step(state, mesh.make_global_batch(batch, setup.mesh))
            history.append(float(metrics["loss"]))
        losses.append(history)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]
