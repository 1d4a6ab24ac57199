"""Full fine-tune of GPT-2 as a plain causal LM on raw text: the bundled review texts by default, or your own
.txt files (documents separated by blank lines) or {"text": ...} JSONL.

Run:  jaxft train configs/gpt2_clm.py --run-dir runs/gpt2 model.source=gpt2 data.train_files=corpus.txt
"""

import dataclasses as dc
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("base", Path(__file__).with_name("base.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
base = _base.config
REVIEWS = Path(__file__).resolve().parent.parent / "jaxft" / "data" / "reviews"

config = base.replace(
    model=dc.replace(base.model, source="gpt2", task="causal-lm"),
    optim=dc.replace(base.optim, learning_rate=5e-5, warmup_steps=20),
    train=dc.replace(base.train, max_steps=300, batch_size=8, eval_every_steps=100, eval_batch_size=8),
    data=dc.replace(
        base.data,
        dataset="files",
        train_files=(str(REVIEWS / "train.jsonl"),),
        eval_files=(str(REVIEWS / "test.jsonl"),),
        max_length=256,
    ),
)
