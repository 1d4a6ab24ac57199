"""Train-step throughput, MFU and compile time of jaxft's ViT image classifier (random weights, no checkpoint needed).

  python bench/vision_throughput.py [--layers N] [--scan-layers auto|true|false] [--no-scan] [--batch B]
      [--steps S] [--labels C] [--peak-tflops T] [--pipeline] --json

A ViT-B/16-shaped model (hidden 768, 12 layers, 12 heads, MLP 3072, patch 16, 224 px, 3 channels, 10 labels),
fully fine-tuned with AdamW (lr 1e-4, optax's other defaults, constant schedule), in the "image-classification"
train step (pixel_values [B, 3, 224, 224] fp32, no mixup: mix_weights 1). Prints one JSON line: images_per_sec,
step_ms (median of the timed steps, compile excluded; step_ms_min their fastest), compile_s (lowering plus XLA
compile of the step), model_tflops_per_sec and mfu.

FLOPs per image: 6·N·T + 12·layers·T²·hidden, with N the parameters in matmuls (every kernel: the patch embedding's,
the layers', the head's) and T = 1 + (224/16)² = 197 tokens; the second term is the attention scores and their
weighted sum (4·T²·hidden a layer forward, twice that backward). It counts the patch embedding and the head as if
they ran on all T tokens with input gradients (under 1% of the total). MFU divides by --peak-tflops, or else by the
fp32 matmul rate this machine reaches on a 2048² matmul measured in the same run (said in the output as
peak_source). Like `jaxft train`, it first sets glibc malloc up for XLA:CPU (--no-host-malloc-tuning: not;
"host_malloc" in the output says which). bench/peers/hf_flax_vit.py is its peer. The layer layout is
model.scan_layers as jaxft resolves it ("auto", the default: per layer on a CPU). --pipeline then measures the
input pipeline alone at the same batch and size (bench/image_pipeline.py, 500x375 JPEGs) and adds its images/s
and its ratio to the step's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxft import hostmem, mesh, setup
from jaxft.config import Config, FreezeConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.models.vit import ViTSpec
from jaxft.paths import path_str

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_throughput import measured_peak_tflops, time_step  # noqa: E402  (a sibling script, not a package)


def make_spec(layers: int, scan: bool, labels: int) -> ViTSpec:
    """ViT-B/16 at 224 px (google/vit-base-patch16-224's shape) with a `labels`-way head."""
    return ViTSpec(
        family="vit",
        hidden_size=768,
        num_layers=layers or 12,
        num_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_act="gelu",
        num_labels=labels,
        scan_layers=scan,
    )


def run(args) -> dict:
    scan = setup.scan_layers(ModelConfig(scan_layers="false" if args.no_scan else args.scan_layers))
    spec = make_spec(args.layers, scan, args.labels)
    cfg = Config(
        model=ModelConfig(
            task="image-classification", scan_layers=scan, remat=args.remat, compute_dtype=args.compute_dtype
        ),
        freeze=FreezeConfig(rules=((r".*", "train"),)),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant"),
        mesh=MeshConfig(),
        train=TrainConfig(batch_size=args.batch),
    )
    skeleton = setup.skeleton_of(spec, cfg, setup.build_mesh(cfg))
    params = setup.init_weights(skeleton, cfg.model.param_dtype)
    built = setup.build_train_setup(cfg, skeleton=skeleton, params=params)
    state, step, plan = built.state, built.step, built.plan
    rng = np.random.default_rng(0)
    b, C, S = args.batch, spec.num_channels, spec.image_size
    labels = rng.integers(0, spec.num_labels, (b,), dtype=np.int32)
    host = {
        "pixel_values": rng.normal(size=(b, C, S, S)).astype(np.float32),  # normalised, channels first
        "labels": labels,
        "mix_labels": labels,
        "mix_weights": np.ones((b,), np.float32),
        "weights": np.ones((b,), np.float32),
    }
    data = mesh.make_global_batch(host, built.mesh)
    compile_s, times, state, metrics = time_step(step, state, data, args.steps)
    step_s = statistics.median(times)
    flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    n = sum(v.size for p, v in flat.items() if p.endswith("kernel"))
    T = spec.num_tokens
    per_image = 6 * n * T + 12 * spec.num_layers * T * T * spec.hidden_size
    achieved = per_image * b / step_s / 1e12
    peak, source = (args.peak_tflops, "given") if args.peak_tflops else (measured_peak_tflops(), "measured fp32 matmul")
    return {
        "impl": "jaxft",
        "model": "vit-b16-224",
        "layers": spec.num_layers,
        "scan_layers": scan,
        "remat": args.remat,
        "compute_dtype": str(setup.compute_dtype(cfg.model, built.mesh)),
        "batch": b,
        "tokens_per_image": T,
        "labels": spec.num_labels,
        "params": sum(v.size for v in flat.values()),
        "trainable_params": plan.count(True),
        "images_per_sec": round(b / step_s, 2),
        "step_ms": round(1000 * step_s, 1),
        "step_ms_min": round(1000 * min(times), 1),  # on a shared machine, the least contended step
        "compile_s": round(compile_s, 2),
        "flops_per_image": per_image,
        "model_tflops_per_sec": round(achieved, 4),
        "peak_tflops": round(peak, 4),
        "peak_source": source,
        "mfu": round(achieved / peak, 4),
        "loss": round(float(metrics["loss"]), 4) if "loss" in metrics else None,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "traces": step.traces,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=0, help="0: ViT-B's 12")
    p.add_argument("--scan-layers", default="auto", choices=("auto", "true", "false"), help="model.scan_layers")
    p.add_argument("--no-scan", action="store_true", help="--scan-layers false: one tensor per layer")
    p.add_argument("--pipeline", action="store_true", help="also the input pipeline's images/s, alone")
    p.add_argument("--remat", default="none")
    p.add_argument(
        "--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="model.compute_dtype"
    )
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--no-host-malloc-tuning", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    # As the CLI does, before anything starts JAX's CPU backend (parsing arguments does not).
    host_malloc = "untouched: --no-host-malloc-tuning" if a.no_host_malloc_tuning else hostmem.tune_malloc_for_xla_cpu()
    out = {**run(a), "host_malloc": host_malloc}
    if a.pipeline:
        import image_pipeline  # the sibling script

        args = image_pipeline.parse([f"--batch={a.batch}", "--size=224"])
        pipe = image_pipeline.run(args)
        out["input_pipeline_images_per_sec"] = round(pipe["images_per_sec"], 1)
        out["input_pipeline_workers"] = pipe["workers"]
        out["input_pipeline_to_step"] = round(pipe["images_per_sec"] / out["images_per_sec"], 1)
    print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
