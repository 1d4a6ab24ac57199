"""Small builders shared by tests: a train state on a given mesh for a tiny checkpoint, and a random batch."""

from __future__ import annotations

import numpy as np

from jaxft.config import Config, FreezeConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxft.setup import TrainSetup, build_train_setup


def make_setup(
    folder,
    mesh_shape=(8, 1, 1),
    rules=((r".*", "train"),),
    optim_cfg=None,
    microbatches=1,
    compute_dtype="float32",
    remat=False,
    dropout_rate=-1.0,
    task="sequence-classification",
    lora=None,
) -> TrainSetup:
    cfg = Config(
        model=ModelConfig(
            source=str(folder), compute_dtype=compute_dtype, remat=remat, dropout_rate=dropout_rate, task=task
        ),
        lora=lora or LoraConfig(),
        mesh=MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]),
        freeze=FreezeConfig(rules=tuple(rules)),
        optim=optim_cfg or OptimConfig(learning_rate=1e-3, warmup_steps=0),
        train=TrainConfig(grad_accum_steps=microbatches),
    )
    return build_train_setup(cfg, num_labels=2)


def random_batch(batch=16, seq=12, seed=0, vocab=30522):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int32)
    mask[:, seq - 3 :] = rng.integers(0, 2, (batch, 3))  # some padding
    return {
        "input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, (batch,), dtype=np.int32),
        "weights": np.ones((batch,), np.float32),
    }


def random_lm_batch(batch=8, seq=12, seed=0, vocab=1000):
    """Two packed examples per row (segments 1 and 2), the last 2 positions padding; the loss on the second."""
    rng = np.random.default_rng(seed)
    cut = seq // 2
    segments = np.array([1] * cut + [2] * (seq - cut - 2) + [0, 0], np.int32)
    positions = np.concatenate([np.arange(cut), np.arange(seq - cut - 2), [0, 0]]).astype(np.int32)
    loss_mask = (segments == 2).astype(np.float32)
    return {
        "input_ids": rng.integers(3, vocab, (batch, seq), dtype=np.int32),
        "loss_mask": np.tile(loss_mask, (batch, 1)),
        "segment_ids": np.tile(segments, (batch, 1)),
        "positions": np.tile(positions, (batch, 1)),
    }
