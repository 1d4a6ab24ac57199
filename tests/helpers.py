"""Small builders shared by tests: a train state on a given mesh for a tiny checkpoint, and a random batch."""

from __future__ import annotations

import numpy as np

from jaxft import compile, freeze, mesh, optim, pretrained
from jaxft.config import Config, FreezeConfig, MeshConfig, ModelConfig, OptimConfig
from jaxft.sharding import replicated
from jaxft.state import create_state, split_params
from jaxft.train import _configured_graphdef, _opt_shardings, build_freeze_plan, lr_multipliers, shardings_of


def make_setup(
    folder,
    mesh_shape=(8, 1, 1),
    rules=((r".*", "train"),),
    optim_cfg=None,
    microbatches=1,
    compute_dtype="float32",
    remat=False,
    dropout_rate=-1.0,
):
    cfg = Config(
        model=ModelConfig(source=str(folder), compute_dtype=compute_dtype, remat=remat, dropout_rate=dropout_rate),
        mesh=MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]),
        freeze=FreezeConfig(rules=tuple(rules)),
        optim=optim_cfg or OptimConfig(learning_rate=1e-3, warmup_steps=0),
    )
    m = mesh.build_mesh(cfg.mesh)
    pre = pretrained.load_pretrained(cfg.model, cfg.load, m, cfg.mesh.rules, num_labels=2)
    plan = build_freeze_plan(cfg, pre.params)
    trainable, frozen = split_params((pre.graphdef, pre.params), set(plan.trainable_paths))
    schedule = optim.build_schedule(cfg.optim, 100)
    tx = optim.build_optimizer(cfg.optim, schedule, lr_multipliers(plan, trainable))
    state = create_state(trainable, frozen, tx, 0, _opt_shardings(tx, trainable, m), replicated(m))
    step = compile.jit_train_step(_configured_graphdef(pre, cfg), tx, schedule, microbatches, shardings_of(state), m)
    return {
        "cfg": cfg,
        "mesh": m,
        "pre": pre,
        "plan": plan,
        "state": state,
        "step": step,
        "tx": tx,
        "graphdef": _configured_graphdef(pre, cfg),
    }


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


__all__ = ["freeze", "make_setup", "random_batch"]
