"""Train-step throughput of jaxft on a real checkpoint, excluding compile.

  python bench/train_throughput.py --model minilm --batch 32 --seq 128 --steps 10 [--frozen-layers N] --json
  python bench/train_throughput.py --model llama-tiny|gpt2-small [decoder_throughput.py's options]

--frozen-layers N freezes the embeddings and encoder layers 0..N-1 (N=0: full fine-tune).
Prints one JSON line: tokens_per_sec, step_ms (median), and the setup. Like `jaxft train`, it first sets
glibc malloc up for XLA:CPU (jaxft/hostmem.py); --no-host-malloc-tuning leaves malloc as it is, and
"host_malloc" in the output says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import numpy as np

from jaxft import freeze, hostmem, mesh
from jaxft.config import Config, FreezeConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.setup import build_train_setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_throughput import timed_steps  # noqa: E402  (a sibling script, not a package)


def run(model: str, batch: int, seq: int, steps: int, frozen_layers: int, compute_dtype: str, host_malloc: str) -> dict:
    rules = freeze.freeze_embeddings_and_first_layers(frozen_layers) if frozen_layers else [(r".*", "train")]
    cfg = Config(
        model=ModelConfig(source=model, compute_dtype=compute_dtype),
        mesh=MeshConfig(),
        freeze=FreezeConfig(rules=tuple(rules)),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=0, schedule="constant"),
        train=TrainConfig(max_steps=steps, batch_size=batch),
    )
    setup = build_train_setup(cfg, num_labels=2)
    state, step, plan = setup.state, setup.step, setup.plan
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(1000, setup.skeleton.spec.vocab_size, (batch, seq), dtype=np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }
    data = mesh.make_global_batch(host, setup.mesh)
    times, state, metrics = timed_steps(step, state, data, steps)
    step_s = statistics.median(times)
    return {
        "impl": "jaxft",
        "model": model,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "frozen_layers": frozen_layers,
        "compute_dtype": compute_dtype,
        "trainable_params": plan.count(True),
        "tokens_per_sec": round(batch * seq / step_s, 1),
        "step_ms": round(1000 * step_s, 1),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "traces": step.traces,
        "host_malloc": host_malloc,
    }


DECODERS = ("llama-tiny", "gpt2-small")  # measured by decoder_throughput.py (tokens/s, MFU, compile time)


def main() -> None:
    if any(m in sys.argv[1:] for m in DECODERS) or any(a.split("=", 1)[-1] in DECODERS for a in sys.argv[1:]):
        import decoder_throughput

        return decoder_throughput.main()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--frozen-layers", type=int, default=0)
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--no-host-malloc-tuning", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    # As the CLI does, before anything starts JAX's CPU backend (parsing arguments does not).
    host_malloc = "untouched: --no-host-malloc-tuning" if a.no_host_malloc_tuning else hostmem.tune_malloc_for_xla_cpu()
    out = run(a.model, a.batch, a.seq, a.steps, a.frozen_layers, a.compute_dtype, host_malloc)
    print(json.dumps(out) if a.json else "\n".join(f"{k}: {v}" for k, v in out.items()), flush=True)


if __name__ == "__main__":
    main()
