"""Remat (activation recomputation) policies by name, shared by every model family's layer runner."""

from __future__ import annotations

from collections.abc import Callable

import jax

# name -> jax.checkpoint policy; "none" (not listed) skips jax.checkpoint, "full" saves nothing and recomputes all.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Saves the weight matmuls but not the [B, N, L, L] attention logits, which dots_saveable also keeps.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
