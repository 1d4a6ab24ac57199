"""Train-step throughput, MFU and compile time of jaxft's decoders (random weights, no checkpoint needed).

  python bench/decoder_throughput.py --model llama-tiny|gpt2-small [--layers N] [--scan-layers auto|true|false]
      [--no-scan] [--lora-rank R]
      [--batch B] [--seq L] [--steps S] [--peak-tflops T] --json

Prints one JSON line: tokens_per_sec, step_ms (median of the timed steps, compile excluded), compile_s (lowering
plus XLA compile of the step), model_tflops_per_sec and mfu. FLOPs per token: a full fine-tune counts
6·N + 12·layers·seq·hidden (N = the parameters in matmuls, the LM head included, embeddings' lookups not); LoRA
counts what it does: 4·N for the forward and input-gradient passes, 2·N_trainable for weight gradients, plus the
same attention term. MFU divides by --peak-tflops, or else by the fp32 matmul rate this machine reaches on a
2048² matmul measured in the same run (said in the output as peak_source). Like `jaxft train`, it first sets
glibc malloc up for XLA:CPU (--no-host-malloc-tuning: not; "host_malloc" in the output says which).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import freeze, hostmem, mesh, setup
from jaxft.config import Config, FreezeConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.models.gpt2 import GPT2Spec
from jaxft.models.llama import LlamaSpec
from jaxft.paths import path_str


def make_spec(name: str, layers: int, scan: bool):
    if name == "llama-tiny":  # a small Llama-3-style block: GQA, SwiGLU, untied head
        return LlamaSpec(
            vocab_size=8192,
            hidden_size=512,
            num_layers=layers or 8,
            num_heads=8,
            num_kv_heads=4,
            head_dim=64,
            intermediate_size=1408,
            scan_layers=scan,
        )
    if name == "gpt2-small":  # GPT-2 small's shape (124M parameters)
        return GPT2Spec(
            vocab_size=50257,
            hidden_size=768,
            num_layers=layers or 12,
            num_heads=12,
            intermediate_size=3072,
            max_positions=1024,
            layer_norm_eps=1e-5,
            hidden_act="gelu_new",
            scale_attn_weights=True,
            scan_layers=scan,
        )
    raise SystemExit(f"unknown --model {name!r} (llama-tiny, gpt2-small)")


def matmul_params(spec, params: dict[str, jax.Array]) -> int:
    """Parameters that take part in a matmul per token: every kernel, plus the LM head (tied or not)."""
    n = sum(v.size for p, v in params.items() if p.endswith("kernel") or p.endswith(("lora_a", "lora_b")))
    untied = any(p.startswith("lm_head") for p in params)
    return n + (0 if untied else spec.vocab_size * spec.hidden_size)


def measured_peak_tflops() -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        out = f(a)
    out.block_until_ready()
    return 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e12


def time_step(step, state, data, steps: int):
    """(compile s, the timed steps' seconds, the state and metrics after them): the step's lowering plus XLA
    compile timed alone, then timed_steps."""
    t = time.perf_counter()
    step.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    return (compile_s, *timed_steps(step, state, data, steps))


def timed_steps(step, state, data, steps: int):
    """(the timed steps' seconds, the state and metrics after them): two untimed calls (the jit cache's compile
    and one warm step), then `steps` timed calls, each waited on."""
    for _ in range(2):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready((state.trainable, metrics))
        times.append(time.perf_counter() - t)
    return times, state, metrics


def run(args) -> dict:
    # The layer layout as jaxft resolves model.scan_layers here ("auto", the default: per layer on CPUs).
    scan = setup.scan_layers(ModelConfig(scan_layers="false" if args.no_scan else args.scan_layers))
    spec = make_spec(args.model, args.layers, scan)
    # LoRA on the attention projections, as the shipped SFT config does.
    targets = (r".*(q|k|v|o)_proj",) if args.model == "llama-tiny" else (r".*c_attn", r".*attn/c_proj")
    lora_cfg = LoraConfig(rank=args.lora_rank, targets=targets)
    rules = tuple(freeze.train_adapters_only()) if args.lora_rank else ((r".*", "train"),)
    cfg = Config(
        model=ModelConfig(task="causal-lm", scan_layers=str(scan).lower(), remat=args.remat),
        lora=lora_cfg,
        freeze=FreezeConfig(rules=rules),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant"),
        mesh=MeshConfig(),
        train=TrainConfig(batch_size=args.batch),
    )
    skeleton = setup.skeleton_of(spec, cfg, setup.build_mesh(cfg))
    params = setup.init_weights(skeleton, cfg.model.param_dtype)
    built = setup.build_train_setup(cfg, skeleton=skeleton, params=params)
    state, step, plan = built.state, built.step, built.plan
    rng = np.random.default_rng(0)
    b, L = args.batch, args.seq
    host = {
        "input_ids": rng.integers(0, spec.vocab_size, (b, L), dtype=np.int32),
        "loss_mask": np.ones((b, L), np.float32),
        "segment_ids": np.ones((b, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (b, 1)),
    }
    data = mesh.make_global_batch(host, built.mesh)
    compile_s, times, state, metrics = time_step(step, state, data, args.steps)
    step_s = statistics.median(times)
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    n = matmul_params(spec, flat)
    n_trainable = plan.count(True)
    attention = 12 * spec.num_layers * L * spec.hidden_size
    per_token = (4 * n + 2 * n_trainable if args.lora_rank else 6 * n) + attention
    achieved = per_token * b * L / step_s / 1e12
    peak, source = (args.peak_tflops, "given") if args.peak_tflops else (measured_peak_tflops(), "measured fp32 matmul")
    return {
        "impl": "jaxft",
        "model": args.model,
        "layers": spec.num_layers,
        "scan_layers": scan,
        "lora_rank": args.lora_rank,
        "remat": args.remat,
        "batch": b,
        "seq": L,
        "params": sum(v.size for v in flat.values()),
        "trainable_params": n_trainable,
        "tokens_per_sec": round(b * L / step_s, 1),
        "step_ms": round(1000 * step_s, 1),
        "compile_s": round(compile_s, 2),
        "flops_per_token": per_token,
        "model_tflops_per_sec": round(achieved, 4),
        "peak_tflops": round(peak, 4),
        "peak_source": source,
        "mfu": round(achieved / peak, 4),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "traces": step.traces,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--layers", type=int, default=0, help="0: the model's own depth")
    p.add_argument("--scan-layers", default="auto", choices=("auto", "true", "false"), help="model.scan_layers")
    p.add_argument("--no-scan", action="store_true", help="--scan-layers false: one tensor per layer")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--remat", default="none")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--no-host-malloc-tuning", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    # As the CLI does, before anything starts JAX's CPU backend (parsing arguments does not).
    host_malloc = "untouched: --no-host-malloc-tuning" if a.no_host_malloc_tuning else hostmem.tune_malloc_for_xla_cpu()
    out = {**run(a), "host_malloc": host_malloc}
    print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
