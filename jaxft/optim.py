"""Optimizer and LR schedule for the trainable partition (optax); frozen parameters never reach it."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxft.config import OptimConfig


def build_schedule(cfg: OptimConfig, max_steps: int) -> optax.Schedule:
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, max_steps)
    end = peak * cfg.end_learning_rate_ratio
    decay_steps = max(max_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only: biases and LayerNorm scales are 1-D (the usual BERT recipe).
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(
    cfg: OptimConfig, schedule: optax.Schedule, lr_multipliers: Any | None = None, scaled: bool | None = None
) -> optax.GradientTransformation:
    """clip → optimizer(schedule) → per-parameter LR multipliers (layer-wise decay, freeze-rule factors). The
    multiplier stage is there when `scaled` says (default: when a multiplier is not 1)."""
    parts = []
    if cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    if cfg.name == "adamw":
        parts.append(
            optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
        )
    elif cfg.name == "sgd":
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
        if cfg.weight_decay:
            parts.insert(-1, optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
    else:
        parts.append(
            optax.adafactor(
                learning_rate=schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask
            )
        )
    if scaled is None:
        scaled = lr_multipliers is not None and any(m != 1.0 for m in jax.tree.leaves(lr_multipliers))
    if scaled and lr_multipliers is not None:
        # The final update is -lr·direction, so scaling it by m is the same as training at lr·m.
        parts.append(
            optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, lr_multipliers))
        )
    return optax.chain(*parts)
