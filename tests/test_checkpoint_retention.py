"""Retention: the latest `checkpoint.keep` checkpoints plus the best by `keep_best_metric` survive."""

import dataclasses
import json

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxft import checkpoint
from jaxft.config import CheckpointConfig
from jaxft.state import TrainState


def _state(step: int) -> TrainState:
    params = nnx.State({"w": nnx.Param(jnp.full((4,), float(step)))})
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        trainable=params,
        frozen=nnx.State({}),
        opt_state=(),
        rng=jnp.zeros((2,), jnp.uint32),
    )


@pytest.mark.parametrize(
    "metric, mode, best",
    [("eval_loss", "auto", 3), ("eval_accuracy", "auto", 4), ("eval_accuracy", "min", 5), ("", "auto", None)],
)
def test_keeps_latest_k_plus_the_best(tmp_path, metric, mode, best):
    cfg = CheckpointConfig(keep=2, keep_best_metric=metric, keep_best_mode=mode)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"checkpoint": dataclasses.asdict(cfg)}}))
    saver = checkpoint.Saver(tmp_path, cfg)
    evals = {2: (0.9, 0.6), 3: (0.2, 0.7), 4: (0.5, 0.95), 5: (0.7, 0.5), 6: None, 7: None}
    for step, ev in evals.items():
        metrics = None if ev is None else {"eval_loss": ev[0], "eval_accuracy": ev[1]}
        saver.save(_state(step), {"process_states": []}, {}, metrics)
        saver.finish()
        if step == 4:  # a resume opens a new manager: the best must be known from disk
            saver.close()
            saver = checkpoint.Saver(tmp_path, cfg)
    saver.close()
    kept = set(checkpoint.complete_steps(tmp_path))
    assert kept == {7, 6} | ({best} if best else set())
    if best:
        assert checkpoint.select_step(tmp_path, best=True) == best
