"""How long a checkpoint save blocks the training loop, next to the step time, on a real checkpoint.

  python bench/checkpoint_blocking.py --model minilm --batch 32 --seq 128 --saves 3 --json

Each save is measured three ways in one run: the time `save` blocks the loop (async: the device→host copy
and the dispatch of the write), the time until the write is committed, and a synchronous save for
comparison. Prints one JSON line with medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxft import checkpoint, mesh
from jaxft.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.setup import build_train_setup


def build(model: str, batch: int, seq: int):
    cfg = Config(
        model=ModelConfig(source=model),
        mesh=MeshConfig(),
        optim=OptimConfig(warmup_steps=0),
        train=TrainConfig(max_steps=1000, batch_size=batch),
    )
    setup = build_train_setup(cfg, num_labels=2)
    rng = np.random.default_rng(0)
    host = {
        "input_ids": rng.integers(1000, setup.skeleton.spec.vocab_size, (batch, seq), dtype=np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }
    return setup.state, setup.step, mesh.make_global_batch(host, setup.mesh)


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def run(model: str, batch: int, seq: int, saves: int) -> dict:
    state, step, data = build(model, batch, seq)
    for _ in range(2):  # compile + one warm step
        state, metrics = step(state, data)
    jax.block_until_ready(state)
    step_times, blocking, committed, sync = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        async_saver = checkpoint.Saver(Path(tmp) / "async", CheckpointConfig(keep_best_metric="", keep=2))
        sync_saver = checkpoint.Saver(
            Path(tmp) / "sync", CheckpointConfig(keep_best_metric="", keep=2, async_save=False)
        )
        for _ in range(saves):
            t = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(state)
            step_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            async_saver.save(state, {"process_states": []}, {})
            blocking.append(time.perf_counter() - t)
            async_saver.finish()
            committed.append(time.perf_counter() - t)
            t = time.perf_counter()
            sync_saver.save(state, {"process_states": []}, {})
            sync_saver.finish()
            sync.append(time.perf_counter() - t)
        async_saver.close()
        sync_saver.close()
    ms = lambda xs: round(1000 * statistics.median(xs), 1)
    return {
        "model": model,
        "batch": batch,
        "seq": seq,
        "saves": saves,
        "state_mb": round(state_bytes(state) / 2**20, 1),
        "step_ms": ms(step_times),
        "save_blocking_ms": ms(blocking),
        "save_committed_ms": ms(committed),
        "sync_save_ms": ms(sync),
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    result = run(a.model, a.batch, a.seq, a.saves)
    print(json.dumps(result) if a.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
