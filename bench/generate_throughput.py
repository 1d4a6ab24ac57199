"""Decode speed of `jaxft.generate` (kv cache: one jitted prefill + one jitted on-device while_loop) against no
cache (the full forward re-run over the padded sequence for every new token), on a random Llama-style model.

  python bench/generate_throughput.py [--batch 4] [--prompt 32] [--new 64] [--layers 2] [--hidden 64] --json

Prints new tokens/s for both (best of --reps after a warm-up) and checks they produced the same tokens. Like
`jaxft generate`, it first sets glibc malloc up for XLA:CPU (jaxft/hostmem.py).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import hostmem
from jaxft.generate import generate
from jaxft.models.llama import LlamaModel, LlamaSpec


def best_of(fn, reps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    host_malloc = hostmem.tune_malloc_for_xla_cpu()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    B, P, N = a.batch, a.prompt, a.new
    spec = LlamaSpec(
        vocab_size=1000,
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=a.hidden // 4,
        intermediate_size=2 * a.hidden,
        max_positions=P + N,
    )
    graphdef, params = nnx.split(LlamaModel(spec, rngs=nnx.Rngs(0)))
    prompts = np.random.default_rng(0).integers(3, 1000, (B, P)).tolist()
    cached = lambda: generate((graphdef, params), prompts, N)

    @jax.jit
    def full_step(params, ids, i):
        logits = nnx.merge(graphdef, params)(ids)
        return ids.at[:, i].set(jnp.argmax(logits[:, i - 1], -1).astype(jnp.int32))

    def uncached():
        ids = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(jnp.asarray(prompts, jnp.int32))
        for i in range(P, P + N):
            ids = full_step(params, ids, i)
        return np.asarray(ids[:, P:]).tolist()

    assert cached() == uncached(), "cached and uncached decoding disagree"
    t_cached, t_uncached = best_of(cached, a.reps), best_of(uncached, max(1, a.reps // 2))
    out = {
        "batch": B,
        "prompt": P,
        "new_tokens": N,
        "layers": a.layers,
        "hidden": a.hidden,
        "cached_tokens_per_sec": round(B * N / t_cached, 1),
        "uncached_tokens_per_sec": round(B * N / t_uncached, 1),
        "speedup": round(t_uncached / t_cached, 2),
        "backend": jax.default_backend(),
        "host_malloc": host_malloc,
    }
    print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
