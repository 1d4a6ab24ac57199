"""PURE train and eval steps over state pytrees; no jit here (compile.py owns that), no feature branches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft import axes
from jaxft.state import TrainState

IGNORE = axes.IGNORE_LABEL


def model_logits(
    graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array], dropout_rng: jax.Array | None
) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], dropout_rng=dropout_rng)


def classification_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy. Sequence labels are [B]; token labels [B, L] with IGNORE for no loss."""
    labels = batch["labels"]
    weights = batch["weights"].astype(jnp.float32)
    if labels.ndim == 2:
        weights = weights[:, None] * (labels != IGNORE)
    safe = jnp.where(labels == IGNORE, 0, labels)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    count = weights.sum()
    correct = ((logits.argmax(-1) == safe) * weights).sum()
    loss_sum = (losses * weights).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def _loss_of_trainable(trainable, frozen, graphdef, batch, rng):
    params = nnx.merge_state(trainable, frozen)
    return classification_loss(model_logits(graphdef, params, batch, rng), batch)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; gradients of the trainable partition only, accumulated over microbatches."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(_loss_of_trainable, has_aux=True)

    def accumulate(carry, xs):
        grads_sum, stats_sum = carry
        micro, index = xs
        (_, stats), grads = grad_fn(state.trainable, state.frozen, graphdef, micro, jax.random.fold_in(step_rng, index))
        # Sum of per-token gradients weighted by token counts, so microbatching equals one big batch.
        grads = jax.tree.map(lambda g: g * stats["count"], grads)
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, stats_sum, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    zero_stats = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    zero_stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zero_stats)
    if microbatches == 1:
        (grads, stats), _ = accumulate((zeros, zero_stats), (batch, 0))
    else:
        (grads, stats), _ = jax.lax.scan(
            accumulate, (zeros, zero_stats), (_microbatches(batch, microbatches), jnp.arange(microbatches))
        )
    count = jnp.maximum(stats["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": stats["loss_sum"] / count,
        "accuracy": stats["correct"] / count,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "tokens": batch["attention_mask"].sum(),
    }
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def eval_step(
    trainable: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, jax.Array]:
    """Sums (loss, correct, count) over one eval batch; the loop adds them up across batches."""
    _, stats = _loss_of_trainable(trainable, frozen, graphdef, batch, None)
    return stats


def predict_step(params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> jax.Array:
    return jax.nn.softmax(model_logits(graphdef, params, batch, None), axis=-1)
