"""PURE train and eval steps over state pytrees; no jit here (compile.py owns that), no feature branches.

A task enters the step as its own forward call and loss (TASKS), bound statically by compile.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.data import IGNORE_LABEL
from jaxft.state import TrainState


def classification_forward(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], dropout_rng=rng)


def image_forward(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array | None) -> jax.Array:
    return model(batch["pixel_values"], dropout_rng=rng)


def causal_lm_forward(model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array | None) -> LMOutput:
    """Final hidden states of packed rows (segment ids keep examples apart, 0 marks padding) and the model's
    LM head: the loss makes the logits, all at once or a chunk at a time (model.logits_chunk)."""
    segments_BxL = batch["segment_ids"]
    hidden_BxLxE = model.hidden_states(
        batch["input_ids"], segments_BxL > 0, segments_BxL, batch["positions"], dropout_rng=rng
    )
    return LMOutput(hidden_BxLxE, model.project, model.logits_chunk)


@dataclasses.dataclass(frozen=True)
class LMOutput:
    """What a causal LM's forward hands its loss: hidden states [B, L, E] and `project`, hidden -> fp32 logits."""

    hidden: jax.Array
    project: Callable[[jax.Array], jax.Array]
    chunk: int = 0  # positions per row whose logits exist at a time (0: all)


def next_token_stats(out: LMOutput, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and argmax hits [B, T] of positions 0..T-1 predicting `targets_BxT`. With a chunk, the
    positions go through the LM head a chunk at a time under jax.checkpoint: the backward pass recomputes
    each chunk's logits instead of keeping [B, T, V] of them."""
    hidden_BxTxE = out.hidden[:, : targets_BxT.shape[1]]

    def stats(h_BxCxE, t_BxC):
        logits_BxCxV = out.project(h_BxCxE).astype(jnp.float32)
        losses_BxC = optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV, t_BxC)
        return losses_BxC, (logits_BxCxV.argmax(-1) == t_BxC).astype(jnp.float32)

    B, T = targets_BxT.shape
    if not out.chunk or out.chunk >= T:
        return stats(hidden_BxTxE, targets_BxT)
    C = out.chunk
    n, pad = -(-T // C), -T % C
    # [B, T, ...] -> [n, B, C, ...]: the scan walks the sequence; the (sharded) batch axis stays where it was.
    chunks = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape((B, n, C) + x.shape[2:])
    h_NxBxCxE = jnp.moveaxis(chunks(hidden_BxTxE), 1, 0)
    t_NxBxC = jnp.moveaxis(chunks(targets_BxT), 1, 0)
    body = jax.checkpoint(lambda carry, xs: (carry, stats(*xs)))
    _, (losses_NxBxC, hits_NxBxC) = jax.lax.scan(body, None, (h_NxBxCxE, t_NxBxC))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * C)[:, :T]
    return unchunk(losses_NxBxC), unchunk(hits_NxBxC)


def classification_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy. Sequence labels are [B]; token labels [B, L] with IGNORE_LABEL for no loss."""
    labels = batch["labels"]
    weights = batch["weights"].astype(jnp.float32)
    if labels.ndim == 2:
        weights = weights[:, None] * (labels != IGNORE_LABEL)
    safe = jnp.where(labels == IGNORE_LABEL, 0, labels)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    count = weights.sum()
    correct = ((logits.argmax(-1) == safe) * weights).sum()
    loss_sum = (losses * weights).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def image_classification_loss(
    logits_BxC: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy against a mix of two labels per image: `mix_weights` of `labels` and the rest of
    `mix_labels` (mixup and cutmix blend two images; without them the weight is 1). Accuracy counts the
    argmax against `labels`, the larger part of the mix."""
    weights_B = batch["weights"].astype(jnp.float32)
    mix_B = batch["mix_weights"].astype(jnp.float32)
    logits_BxC = logits_BxC.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels
    losses_B = mix_B * ce(logits_BxC, batch["labels"]) + (1.0 - mix_B) * ce(logits_BxC, batch["mix_labels"])
    count = weights_B.sum()
    correct = ((logits_BxC.argmax(-1) == batch["labels"]) * weights_B).sum()
    loss_sum = (losses_B * weights_B).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def causal_lm_loss(out: LMOutput, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy, token-weighted: position t predicts token t+1 of the same segment, and only
    tokens marked in loss_mask (completions, unless the prompt trains too) are targets."""
    targets_BxL = batch["input_ids"][:, 1:]
    segments_BxL = batch["segment_ids"]
    same_segment = (segments_BxL[:, 1:] == segments_BxL[:, :-1]) & (segments_BxL[:, 1:] > 0)
    weights_BxL = batch["loss_mask"][:, 1:].astype(jnp.float32) * same_segment
    losses_BxL, hits_BxL = next_token_stats(out, targets_BxL)
    count = weights_BxL.sum()
    correct = (hits_BxL * weights_BxL).sum()
    loss_sum = (losses_BxL * weights_BxL).sum()
    return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "correct": correct, "count": count}


def _token_sizes(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    real = (batch["attention_mask"] if "attention_mask" in batch else batch["segment_ids"] > 0).sum()
    return real, jnp.asarray(batch["input_ids"].size, jnp.int32)  # rows × this batch's bucket length


def _image_sizes(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    images = jnp.asarray(batch["pixel_values"].shape[0], jnp.int32)
    return images, images


@dataclasses.dataclass(frozen=True)
class Task:
    """How a task runs through the shared step: its batch fields, forward call, loss, and extra eval sums."""

    fields: tuple[str, ...]
    forward: Callable[[nnx.Module, dict[str, jax.Array], jax.Array | None], Any]  # logits, or an LMOutput
    loss: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
    eval_sums: Callable[[jax.Array, dict[str, jax.Array]], dict[str, jax.Array]] | None
    # batch -> (tokens that are not padding, tokens computed on): the loop's throughput counts. Image tasks count
    # images (both the same).
    sizes: Callable[[dict[str, jax.Array]], tuple[jax.Array, jax.Array]] = _token_sizes
    unit: str = "tokens"  # what `sizes` counts, as the metrics name it (tokens_per_sec, images_per_sec)


def model_logits(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array | None,
    task: str = "sequence-classification",
) -> jax.Array:
    """The task's logits, whole (a causal LM's [B, L, V] too)."""
    out = _forward(graphdef, params, batch, dropout_rng, task)
    return out.project(out.hidden) if isinstance(out, LMOutput) else out


def _forward(graphdef, params, batch, rng, task):
    return TASKS[task].forward(nnx.merge(graphdef, params), batch, rng)


def _loss_of_trainable(trainable, frozen, graphdef, batch, rng, task):
    params = nnx.merge_state(trainable, frozen)
    return TASKS[task].loss(_forward(graphdef, params, batch, rng, task), batch)


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
    task: str = "sequence-classification",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; gradients of the trainable partition only, accumulated over microbatches."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(_loss_of_trainable, has_aux=True)

    def accumulate(carry, xs):
        grads_sum, stats_sum = carry
        micro, index = xs
        rng = jax.random.fold_in(step_rng, index)
        (_, stats), grads = grad_fn(state.trainable, state.frozen, graphdef, micro, rng, task)
        if microbatches > 1:
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
    if microbatches > 1:
        grads = jax.tree.map(lambda g: g / count, grads)  # (one microbatch's loss is its mean already)
    loss = stats["loss_sum"] / count
    grad_norm = optax.tree.norm(grads)  # the same expression as clip_by_global_norm's: XLA computes it once
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # A non-finite loss, gradient or new parameter drops the whole update, so the state (and every
    # checkpoint of it) stays finite; the host decides from `nonfinite` whether to halt or go on.
    bad_leaf_G = nonfinite_leaves(grads, grad_norm)
    bad_leaf_P = nonfinite_leaves(trainable)
    finite = _all_finite([loss, ~bad_leaf_G, ~bad_leaf_P])
    # A cond, not a select per leaf: the select reads both states and writes a third, every step (another 3.5% of a
    # ViT-B step on a CPU), where the cond's branch copies only one.
    trainable, opt_state = jax.lax.cond(
        finite, lambda: (trainable, opt_state), lambda: (state.trainable, state.opt_state)
    )
    real, padded = TASKS[task].sizes(batch)
    metrics = {
        "loss": loss,
        "accuracy": stats["correct"] / count,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        # Non-padding and all tokens (images, for image tasks) of the batch: the loop's throughput figures.
        "tokens": real,
        "padded_tokens": padded,
        "nonfinite": (~finite).astype(jnp.int32),
        # Index (in jax.tree.leaves(trainable) order) of the first non-finite gradient, or -1.
        "nonfinite_leaf": jnp.where(bad_leaf_G.any(), jnp.argmax(bad_leaf_G), -1).astype(jnp.int32),
    }
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def nonfinite_leaves(tree, norm: jax.Array | None = None) -> jax.Array:
    """[n] bool, for the n inexact leaves of `tree`: which hold a non-finite value. `norm`: the L2 norm of those
    leaves where the caller has it, else computed here (in fp32).

    A non-finite value makes the norm non-finite; a finite norm therefore clears every leaf, and only when it is
    not (a non-finite value, or squares that overflow: a value beyond ~1.8e19) are the leaves tested one by one,
    under lax.cond. The common case costs no pass over the tree beyond the norm's, which the step computes anyway
    for the gradients' clipping and metric; an isfinite test of every leaf each step (XLA:CPU writes its boolean
    array out, then reduces it) was about 2.5% of a ViT-B step's op time on a CPU."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.zeros((0,), jnp.bool_)
    if norm is None:
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    return jax.lax.cond(
        jnp.isfinite(norm),
        lambda: jnp.zeros((len(leaves),), jnp.bool_),
        lambda: jnp.stack([~jnp.isfinite(x).all() for x in leaves]),
    )


def _all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of `tree` is finite (a boolean leaf counts as finite where it is True).

    The answer is read at the first offending leaf, found by argmax, rather than by `.all()`: XLA rewrites an
    all() of stacked scalars into a chain of scalar ands and copies that chain into the fusion of every
    consumer, here every parameter's select, which made the step's compile quadratic in the leaf count
    (a tiny BERT's compiled step: 44k HLO lines instead of 17k, and 8 s of compile instead of 4 on CPU)."""
    bad = [
        ~(x if x.dtype == jnp.bool_ else jnp.isfinite(x)).all()
        for x in jax.tree.leaves(tree)
        if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not bad:
        return jnp.asarray(True)
    bad = jnp.stack(bad)
    return ~bad[jnp.argmax(bad)]


def eval_step(
    trainable: nnx.State,
    frozen: nnx.State,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    task: str = "sequence-classification",
) -> dict[str, jax.Array]:
    """Sums over one eval batch: (loss, correct, count), plus per-class counts for macro-F1 in classification;
    the loop adds them up across batches."""
    out = _forward(graphdef, nnx.merge_state(trainable, frozen), batch, None, task)
    _, stats = TASKS[task].loss(out, batch)
    extra = TASKS[task].eval_sums
    return {**stats, **(extra(out, batch) if extra else {})}


MAX_CONFUSION_CLASSES = 64


def class_counts(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Weighted per-class true-positive, predicted and true counts ([C] each)."""
    labels = batch["labels"]
    weights = batch["weights"].astype(jnp.float32)
    if labels.ndim == 2:
        weights = weights[:, None] * (labels != IGNORE_LABEL)
    num_classes = logits.shape[-1]
    pred_C = jax.nn.one_hot(logits.argmax(-1), num_classes) * weights[..., None]
    true_C = jax.nn.one_hot(jnp.where(labels == IGNORE_LABEL, 0, labels), num_classes) * weights[..., None]
    axes_ = tuple(range(pred_C.ndim - 1))
    sums = {"tp": (pred_C * true_C).sum(axes_), "predicted": pred_C.sum(axes_), "true": true_C.sum(axes_)}
    # [true class, predicted class] counts, for `jaxft plot`'s confusion matrix (only for a modest class count:
    # the eval metrics hold it).
    if num_classes <= MAX_CONFUSION_CLASSES:
        flat_true, flat_pred = true_C.reshape(-1, num_classes), pred_C.reshape(-1, num_classes)
        sums["confusion"] = jnp.einsum("nt,np->tp", flat_true, (flat_pred > 0).astype(jnp.float32))
    return sums


def top5_count(logits_BxC: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Class counts plus the weighted count of examples whose label is among the 5 highest logits (with 5 classes
    or more)."""
    sums = class_counts(logits_BxC, batch)
    if logits_BxC.shape[-1] >= 5:
        _, top_Bx5 = jax.lax.top_k(logits_BxC, 5)
        hit_B = (top_Bx5 == batch["labels"][:, None]).any(-1)
        sums["top5_correct"] = (hit_B * batch["weights"].astype(jnp.float32)).sum()
    return sums


def predict_step(
    params: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, task: str = "sequence-classification"
) -> jax.Array:
    return jax.nn.softmax(model_logits(graphdef, params, batch, None, task), axis=-1)


_CLASSIFICATION_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weights")


TASKS: dict[str, Task] = {
    "sequence-classification": Task(_CLASSIFICATION_FIELDS, classification_forward, classification_loss, class_counts),
    "token-classification": Task(_CLASSIFICATION_FIELDS, classification_forward, classification_loss, class_counts),
    "causal-lm": Task(("input_ids", "loss_mask", "segment_ids", "positions"), causal_lm_forward, causal_lm_loss, None),
    "image-classification": Task(
        ("pixel_values", "labels", "mix_labels", "mix_weights", "weights"),
        image_forward,
        image_classification_loss,
        top5_count,
        _image_sizes,
        "images",
    ),
}

# What predict feeds each task (no labels).
PREDICT_FIELDS = {"image-classification": ("pixel_values",)}


def batch_shapes(
    task: str, batch_size: int, max_length: int, image_shape: tuple[int, ...] = ()
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one global train batch of `task`, as the data pipelines build it (image tasks:
    `image_shape` is (C, H, W))."""
    if task == "image-classification":
        B = (batch_size,)
        shapes = {"pixel_values": (B + tuple(image_shape), jnp.float32), "mix_weights": (B, jnp.float32)}
        shapes["weights"] = (B, jnp.float32)
        return {k: jax.ShapeDtypeStruct(*shapes.get(k, (B, jnp.int32))) for k in TASKS[task].fields}
    rows = (batch_size, max_length)
    if task == "causal-lm":
        dtypes = {"input_ids": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32, "positions": jnp.int32}
        return {k: jax.ShapeDtypeStruct(rows, dtypes[k]) for k in TASKS[task].fields}
    labels = rows if task == "token-classification" else (batch_size,)
    shapes = {"labels": (labels, jnp.int32), "weights": ((batch_size,), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(*shapes.get(k, (rows, jnp.int32))) for k in TASKS[task].fields}
