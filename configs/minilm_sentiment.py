"""The default job: all-MiniLM-L6-v2 on the bundled review-sentiment dataset (negative/positive).

Freezes the embeddings and encoder layers 0-2; trains layers 3-5, the pooler and the head.
Run:  make demo    or    jaxft train configs/minilm_sentiment.py --run-dir runs/minilm_sentiment
"""

import dataclasses as dc
import importlib.util
from pathlib import Path

from jaxft.freeze import freeze_embeddings_and_first_layers

_spec = importlib.util.spec_from_file_location("base", Path(__file__).with_name("base.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

config = _base.config.replace(
    model=dc.replace(_base.config.model, source="minilm"),
    freeze=dc.replace(_base.config.freeze, rules=tuple(freeze_embeddings_and_first_layers(3))),
    optim=dc.replace(_base.config.optim, learning_rate=1e-4, warmup_steps=10, weight_decay=0.01),
    train=dc.replace(_base.config.train, max_steps=120, batch_size=32, eval_every_steps=40, log_every_steps=10),
    data=dc.replace(_base.config.data, dataset="reviews", max_length=64),
    checkpoint=dc.replace(_base.config.checkpoint, every_steps=40),
)
