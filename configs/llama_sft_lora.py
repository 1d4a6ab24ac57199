"""LoRA SFT of a Llama-family decoder (Llama 3.x, Mistral, Qwen2/2.5/3) on prompt/completion or chat JSONL.

The base model is frozen in bf16; rank-16 adapters on the attention projections train in fp32. The loss covers
the assistant's tokens only, and examples are packed into rows of data.max_length. Checkpoints hold the adapters
and their optimizer state only; the base is recorded by path and sha256 and read again on restore.
Run (the checkpoint as a local folder, or a hub id where the hub is reachable):
  jaxft train configs/llama_sft_lora.py --run-dir runs/sft model.source=Qwen/Qwen2.5-0.5B \
      data.train_files=my_train.jsonl data.eval_files=my_eval.jsonl
"""

from pathlib import Path

from jaxft.config import base
from jaxft.freeze import train_adapters_only

DEMO = Path(__file__).resolve().parent.parent / "jaxft" / "data" / "sft_demo"

config = base(
    model={"source": "Qwen/Qwen2.5-0.5B", "task": "causal-lm", "frozen_dtype": "bfloat16"},
    lora={"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": [r".*(q|k|v|o)_proj"]},
    freeze={"rules": train_adapters_only()},
    optim={"learning_rate": 2e-4, "warmup_steps": 10, "weight_decay": 0.0},
    train={"max_steps": 200, "batch_size": 8, "eval_every_steps": 50, "eval_batch_size": 8},
    data={
        "dataset": "files",
        "train_files": [str(DEMO / "train.jsonl")],
        "eval_files": [str(DEMO / "test.jsonl")],
        "max_length": 512,
    },
    checkpoint={"every_steps": 50, "save_frozen": False},
)
