"""Peer benchmark: Hugging Face transformers' FlaxViTForImageClassification.

Full fine-tune of a randomly initialised ViT with the shape of bench/vision_throughput.py's model (ViT-B/16 at
224 px: hidden 768, 12 layers, 12 heads, MLP 3072, 3 channels, a 10-label head), cross-entropy loss, optax.adamw,
one jax.jit train step (forward + loss + backward + optimizer update, train=True with a dropout key as a fine-tune
runs it; ViTConfig's dropout rates are 0, as in jaxft's model) that donates the parameters, the optimizer state and
the key, as the BERT peer does. Same protocol as the other peers: 2 warmup steps (compilation excluded), then
--steps timed steps, each waited on with block_until_ready. images_per_sec and step_ms come from the median timed
step, as in bench/vision_throughput.py (the figures it is read against); compile_s is the step's lowering plus
XLA compile, timed ahead of the warmup as vision_throughput.py times it.

  .bench-venvs/hf-flax/bin/python bench/peers/hf_flax_vit.py [--batch 8] [--steps 5] --json

Runs in the hf-flax venv (bench/peers/requirements-hf-flax.txt; bench/run_peers.sh makes it): transformers 4.57.x
is the last release with the Flax model classes. No checkpoint and no download: the weights are the model's own
random init.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: bench/vision_throughput.py's.
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's computation dtype")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from transformers import FlaxViTForImageClassification, ViTConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the Flax deprecation notice

    config = ViTConfig(
        hidden_size=768,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        image_size=224,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        num_labels=args.labels,
    )
    model = FlaxViTForImageClassification(config, seed=0, dtype=jnp.dtype(args.dtype))

    rng = np.random.default_rng(0)
    shape = (args.batch, config.num_channels, config.image_size, config.image_size)
    pixel_values = jnp.asarray(rng.normal(size=shape), jnp.float32)  # normalised, channels first, as HF's takes
    labels = jnp.asarray(rng.integers(0, args.labels, (args.batch,)), jnp.int32)

    tx = optax.adamw(args.lr)
    params = model.params
    opt_state = tx.init(params)

    def loss_fn(params, pixel_values, labels, dropout_rng):
        logits = model(pixel_values, params=params, dropout_rng=dropout_rng, train=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, opt_state, key, pixel_values, labels):
        key, dropout_rng = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, pixel_values, labels, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, key, loss

    # Donating params and optimizer state lets XLA update them in place, as jaxft's step does.
    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    key = jax.random.PRNGKey(0)

    t0 = time.perf_counter()
    step.lower(params, opt_state, key, pixel_values, labels).compile()
    compile_s = time.perf_counter() - t0

    def run_one(params, opt_state, key):
        params, opt_state, key, loss = step(params, opt_state, key, pixel_values, labels)
        jax.block_until_ready((params, opt_state, loss))
        return params, opt_state, key, loss

    for _ in range(args.warmup):  # first call compiles (the jit cache's own); excluded from timing
        params, opt_state, key, loss = run_one(params, opt_state, key)

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, key, loss = run_one(params, opt_state, key)
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    images_per_sec = args.batch / step_s
    if not np.isfinite(float(loss)):
        print(f"non-finite loss: {float(loss)}", file=sys.stderr)
        return 1

    result = {
        "impl": "hf-flax",
        "model": "vit-b16-224",
        "layers": args.layers,
        "batch": args.batch,
        "dtype": args.dtype,
        "steps": args.steps,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
        "images_per_sec": round(images_per_sec, 2),
        "step_ms": round(1000.0 * step_s, 1),
        "step_ms_min": round(1000.0 * min(times), 1),
        "compile_s": round(compile_s, 2),
        "loss": round(float(loss), 4),
        "jax": jax.__version__,
        "transformers": transformers.__version__,
    }
    # Per-step spread on stderr (stdout stays one JSON line): on a shared 2-core
    # machine the min is the least contended estimate.
    ms = sorted(1000.0 * t for t in times)
    print(
        f"hf-flax-vit: step ms min {ms[0]:.1f} / median {1000.0 * step_s:.1f} / max {ms[-1]:.1f}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"hf-flax-vit: {images_per_sec:,.2f} images/s, {1000.0 * step_s:.1f} ms/step "
            f"(batch {args.batch}, {args.steps} steps, jax {jax.__version__}, "
            f"transformers {transformers.__version__}, final loss {float(loss):.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
