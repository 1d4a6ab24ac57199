"""The smoke config: a few steps of a small batch with short rows on the bundled review data, evaluating and
saving every 2 steps. Tests point it at their tiny checkpoints and data files with overrides.

Run:  jaxft train configs/tiny.py --run-dir runs/tiny [model.source=/path/to/tiny data.dataset=files ...]
"""

from jaxft.config import base

config = base(
    model={"source": "minilm"},
    mesh={"data": -1},
    optim={"learning_rate": 1e-3, "warmup_steps": 0},
    train={"max_steps": 6, "batch_size": 8, "eval_every_steps": 2, "eval_batch_size": 8, "log_every_steps": 1},
    data={"dataset": "reviews", "max_length": 16},
    checkpoint={"every_steps": 2, "keep": 10},
)
