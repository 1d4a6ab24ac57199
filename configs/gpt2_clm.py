"""Full fine-tune of GPT-2 as a plain causal LM on raw text: the bundled review texts by default, or your own
.txt files (documents separated by blank lines) or {"text": ...} JSONL.

Run:  jaxft train configs/gpt2_clm.py --run-dir runs/gpt2 model.source=gpt2 data.train_files=corpus.txt
"""

from pathlib import Path

from jaxft.config import base

REVIEWS = Path(__file__).resolve().parent.parent / "jaxft" / "data" / "reviews"

config = base(
    model={"source": "gpt2", "task": "causal-lm"},
    optim={"learning_rate": 5e-5, "warmup_steps": 20},
    train={"max_steps": 300, "batch_size": 8, "eval_every_steps": 100, "eval_batch_size": 8},
    data={
        "dataset": "files",
        "train_files": [str(REVIEWS / "train.jsonl")],
        "eval_files": [str(REVIEWS / "test.jsonl")],
        "max_length": 256,
    },
)
