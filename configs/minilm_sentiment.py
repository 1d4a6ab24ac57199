"""The default job: all-MiniLM-L6-v2 on the bundled review-sentiment dataset (negative/positive).

Freezes the embeddings and encoder layers 0-2; trains layers 3-5, the pooler and the head.
Run:  make demo    or    jaxft train configs/minilm_sentiment.py --run-dir runs/minilm_sentiment
"""

from jaxft.config import base
from jaxft.freeze import freeze_embeddings_and_first_layers

config = base(
    model={"source": "minilm"},
    freeze={"rules": freeze_embeddings_and_first_layers(3)},
    optim={"learning_rate": 1e-4, "warmup_steps": 10, "weight_decay": 0.01},
    train={"max_steps": 120, "batch_size": 32, "eval_every_steps": 40, "log_every_steps": 10},
    data={"dataset": "reviews", "max_length": 64},
    checkpoint={"every_steps": 40},
)
