"""Peer benchmark: Hugging Face transformers' FlaxLlamaForCausalLM.

Full fine-tune of a randomly initialised decoder with the shape of jaxft's `llama-tiny`
(bench/decoder_throughput.py: vocab 8192, hidden 512, 8 layers, 8 heads / 4 KV heads,
head_dim 64, SwiGLU 1408, untied LM head), causal-LM loss, optax.adamw, one jax.jit
train step (forward + loss + backward + optimizer update) that donates the parameters
and the optimizer state, as the BERT peer does. Same protocol as the other peers:
2 warmup steps (compilation excluded), then --steps timed steps, each waited on with
block_until_ready. tokens_per_sec and step_ms come from the median timed step, as in
bench/decoder_throughput.py (the figures it is read against).

  .bench-venvs/hf-flax/bin/python bench/peers/hf_flax_llama.py [--batch 8] [--seq 256] [--steps 5] --json

Runs in the hf-flax venv (bench/peers/requirements-hf-flax.txt; bench/run_peers.sh makes
it): transformers 4.57.x is the last release with the Flax model classes. No checkpoint
and no download: the weights are the model's own random init.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: bench/decoder_throughput.py's for llama-tiny.
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from transformers import FlaxLlamaForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the Flax deprecation notice

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1408,
        hidden_act="silu",
        # jaxft's LlamaSpec defaults, which llama-tiny keeps. (HF's Flax RoPE uses 10000
        # whatever rope_theta says; the value does not change the cost anyway.)
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        # Only sizes the RoPE table and causal-mask constant that the Flax code slices to --seq;
        # LlamaConfig's own default.
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    model = FlaxLlamaForCausalLM(config, seed=0, dtype=jnp.float32)

    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    attention_mask = jnp.ones((args.batch, args.seq), jnp.int32)

    tx = optax.adamw(args.lr)
    params = model.params
    opt_state = tx.init(params)

    def loss_fn(params, input_ids, attention_mask):
        # train=True as a fine-tune would run it; Llama has no dropout, so no dropout_rng.
        logits = model(input_ids, attention_mask=attention_mask, params=params, train=True).logits
        # Next-token prediction: position t predicts token t+1.
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:]).mean()

    def train_step(params, opt_state, input_ids, attention_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    # Donating params and optimizer state lets XLA update them in place, as jaxft's step does.
    step = jax.jit(train_step, donate_argnums=(0, 1))

    def run_one(params, opt_state):
        params, opt_state, loss = step(params, opt_state, input_ids, attention_mask)
        jax.block_until_ready((params, opt_state, loss))
        return params, opt_state, loss

    for _ in range(args.warmup):  # first call compiles; excluded from timing
        params, opt_state, loss = run_one(params, opt_state)

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, opt_state, loss = run_one(params, opt_state)
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    tokens_per_sec = args.batch * args.seq / step_s
    if not np.isfinite(float(loss)):
        print(f"non-finite loss: {float(loss)}", file=sys.stderr)
        return 1

    result = {
        "impl": "hf-flax",
        "model": "llama-tiny",
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_ms": round(1000.0 * step_s, 2),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
        "jax": jax.__version__,
        "transformers": transformers.__version__,
    }
    # Per-step spread on stderr (stdout stays one JSON line): on a shared 2-core
    # machine the min is the least contended estimate.
    ms = sorted(1000.0 * t for t in times)
    print(
        f"hf-flax-llama: step ms min {ms[0]:.1f} / median {1000.0 * step_s:.1f} / max {ms[-1]:.1f}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"hf-flax-llama: {tokens_per_sec:,.0f} tokens/s, {1000.0 * step_s:.1f} ms/step "
            f"(batch {args.batch} x seq {args.seq}, {args.steps} steps, "
            f"jax {jax.__version__}, transformers {transformers.__version__}, "
            f"final loss {float(loss):.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
