"""The accelerator check's figures, one JSON line each (bench/accelerator_check.sh runs every part).

  python bench/accelerator_check.py step --model minilm|llama-1b [--quick]
  python bench/accelerator_check.py resume [--quick]
  python bench/accelerator_check.py sft [--quick]

step: a bf16 train step (MiniLM at 32 × 128 from its checkpoint; a random Llama with Llama-3.2-1B's shapes at
8 × 2048 with remat and scanned layers): tokens/s, MFU against the device's dense bf16 peak (jaxft.targets), the
device's peak memory from memory_stats() against the compiled step's own prediction (what `plan --target local`
reports), and the compile time. resume: `jaxft train` of configs/tiny.py (6 steps, a checkpoint every 2), then
continued from its last checkpoint to step 8. sft: a 50-step LoRA SFT of a tiny Qwen2 with configs/llama_sft_lora.py.
--quick shrinks every shape so that the script can be tried on a CPU (JAX_PLATFORMS=cpu) first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def step_figures(model: str, quick: bool) -> None:
    import jax
    import numpy as np

    from jaxft import mesh as mesh_lib
    from jaxft import plan as plan_lib
    from jaxft import setup, step, targets
    from jaxft.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

    seq = {"minilm": 16 if quick else 128, "llama-1b": 64 if quick else 2048}[model]
    batch = {"minilm": 4 if quick else 32, "llama-1b": 2 if quick else 8}[model]
    task = "sequence-classification" if model == "minilm" else "causal-lm"
    cfg = Config(
        model=ModelConfig(
            source="minilm", task=task, compute_dtype="bfloat16", remat="none" if model == "minilm" else "full"
        ),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant"),
        train=TrainConfig(batch_size=batch),
        data=DataConfig(max_length=seq),
    )
    if model == "minilm":
        built = setup.build_train_setup(cfg, num_labels=2)
    else:
        from jaxft.models.llama import LlamaSpec

        spec = LlamaSpec(
            vocab_size=1024 if quick else 128256,
            hidden_size=256 if quick else 2048,
            num_layers=2 if quick else 16,
            num_heads=8 if quick else 32,
            num_kv_heads=4 if quick else 8,
            head_dim=32 if quick else 64,
            intermediate_size=512 if quick else 8192,
            tie_word_embeddings=True,
            scan_layers=True,
        )
        skeleton = setup.skeleton_of(spec, cfg, setup.build_mesh(cfg))
        built = setup.build_train_setup(cfg, skeleton=skeleton, params=setup.init_weights(skeleton, "float32"))
    parts = plan_lib.PlanParts(cfg, built.mesh, built.skeleton, built.plan, built.layout, built.schedule)
    t = time.perf_counter()
    predicted = plan_lib.compile_train_step(parts)  # the same compile `plan --target local` reports
    compile_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    vocab = built.skeleton.spec.vocab_size
    host = {
        k: (rng.integers(1, vocab, v.shape, dtype=np.int32) if k == "input_ids" else np.ones(v.shape, v.dtype))
        for k, v in step.batch_shapes(task, batch, seq).items()
    }
    if task == "causal-lm":
        host["positions"] = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    else:
        host["labels"] = rng.integers(0, 2, (batch,), dtype=np.int32)
    data = mesh_lib.make_global_batch(host, built.mesh)
    state = built.state
    for _ in range(2):
        state, metrics = built.step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(3 if quick else 10):
        t = time.perf_counter()
        state, metrics = built.step(state, data)
        jax.block_until_ready((state.trainable, metrics))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    target = targets.local_target()
    flops = predicted["flops_per_step"]
    stats = device.memory_stats() or {}
    emit(
        check="train_step",
        model=model,
        batch=batch,
        seq=seq,
        device=device.device_kind,
        tokens_per_sec=round(batch * seq / step_s, 1),
        step_ms=round(step_s * 1e3, 2),
        mfu=round(flops / step_s / target.peak_flops, 4) if flops and target.peak_flops else None,  # per device
        peak_flops=target.peak_flops,
        peak_bytes_in_use=stats.get("peak_bytes_in_use"),
        predicted_peak_bytes=predicted["per_device"]["peak_bytes"],
        attention=predicted["attention"],
        compile_s=round(compile_s, 1),
        loss=float(metrics["loss"]),
    )


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxft.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def resume_figures(quick: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        extra = ["data.max_length=16"] if quick else []
        t = time.perf_counter()
        first = cli("train", "configs/tiny.py", "--run-dir", str(run), *extra)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        # Two steps more than the finished run: its last checkpoint is restored, on purpose with a longer run.
        again = cli(
            "train", "configs/tiny.py", "--run-dir", str(run), "train.max_steps=8", "--allow-config-change", *extra
        )
        again_s = time.perf_counter() - t
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        emit(
            check="checkpoint_resume",
            first_rc=first.returncode,
            resume_rc=again.returncode,
            resumed_from=next(
                (ln.split("resuming from ")[1] for ln in again.stderr.splitlines() if "resuming from " in ln), None
            ),
            steps=steps,
            first_s=round(first_s, 1),
            resume_s=round(again_s, 1),
            error=(first.stderr + again.stderr).strip().splitlines()[-1:]
            if first.returncode or again.returncode
            else [],
        )


def sft_figures(quick: bool) -> None:
    from tests.fixtures import save_tiny_chat_model

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_chat_model(Path(tmp) / "chat")
        run = Path(tmp) / "run"
        steps = 10 if quick else 50
        t = time.perf_counter()
        r = cli(
            "train",
            "configs/llama_sft_lora.py",
            "--run-dir",
            str(run),
            f"model.source={model}",
            f"train.max_steps={steps}",
            "train.log_every_steps=1",
            "train.eval_every_steps=0",
            "checkpoint.every_steps=0",
            "data.max_length=96",
            "optim.learning_rate=1e-2",
            "optim.warmup_steps=0",
            "lora.rank=4",
        )
        losses = (
            [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            if r.returncode == 0
            else []
        )
        emit(
            check="lora_sft",
            steps=steps,
            rc=r.returncode,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            seconds=round(time.perf_counter() - t, 1),
            error=r.stderr.strip().splitlines()[-1:] if r.returncode else [],
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("step", "resume", "sft"))
    p.add_argument("--model", default="minilm", choices=("minilm", "llama-1b"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    from jaxft import hostmem

    os.environ.setdefault("JAXFT_XLA_CACHE", "off")  # every figure is of a fresh compile
    hostmem.keep_jax_off_absent_accelerators()
    hostmem.tune_malloc_for_xla_cpu()
    {
        "step": lambda: step_figures(a.model, a.quick),
        "resume": lambda: resume_figures(a.quick),
        "sft": lambda: sft_figures(a.quick),
    }[a.part]()


if __name__ == "__main__":
    main()
