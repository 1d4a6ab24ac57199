"""The only jax.jit of the train, eval and predict steps: shardings in and out, state donation, and a trace count.

`plan` lowers these same jitted callables ahead of time (`.lower(...)`). Generation's prefill and decode loop are
jitted where they are defined, in generate.py: they take the model's parameters as plain arguments, need no
shardings of their own and are not steps of a run. Initialisers (state.py, models) jit their one-off inits.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxft import mesh as mesh_lib
from jaxft import step as step_lib
from jaxft.sharding import replicated
from jaxft.state import TrainState


class CountingJit:
    """A jitted callable that counts how often Python traced it (tests assert it is once per run)."""

    def __init__(self, fn, **jit_kwargs):
        self.traces = 0

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.traces += 1
            return fn(*args, **kwargs)

        self.jitted = jax.jit(counted, **jit_kwargs)

    def __call__(self, *args):
        return self.jitted(*args)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def trace(self, *args):
        return self.jitted.trace(*args)


def batch_shardings(mesh: Mesh, fields=("input_ids", "attention_mask", "token_type_ids", "labels", "weights")):
    return {k: mesh_lib.batch_sharding(mesh) for k in fields}


def jit_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int,
    state_shardings: TrainState,
    mesh: Mesh,
    task: str = "sequence-classification",
) -> CountingJit:
    fn = functools.partial(
        step_lib.train_step,
        graphdef=graphdef,  # static: the model's structure
        tx=tx,
        schedule=schedule,  # static: pure functions of (grads, state, step)
        microbatches=microbatches,  # static: shapes the scan
        task=task,  # static: the forward call and loss (step.TASKS)
    )
    return CountingJit(
        fn,
        in_shardings=(
            state_shardings,  # the state stays where it lives: no resharding per step
            batch_shardings(mesh, step_lib.TASKS[task].fields),  # rows split over (data, fsdp)
        ),
        out_shardings=(state_shardings, replicated(mesh)),  # metrics are scalars, replicated
        donate_argnums=(0,),  # the old state's buffers become the new state's: no second copy
    )


def jit_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, task: str = "sequence-classification") -> CountingJit:
    # Parameters arrive committed to their shardings; their partition into trainable/frozen changes with
    # gradual unfreezing, so it is not fixed here (a new partition retraces, a new step does not).
    fn = functools.partial(step_lib.eval_step, graphdef=graphdef, task=task)
    return CountingJit(fn, out_shardings=replicated(mesh))


def jit_predict_step(
    graphdef: nnx.GraphDef, param_shardings: Any, mesh: Mesh, task: str = "sequence-classification"
) -> CountingJit:
    fn = functools.partial(step_lib.predict_step, graphdef=graphdef, task=task)
    fields = step_lib.PREDICT_FIELDS.get(task, ("input_ids", "attention_mask", "token_type_ids"))
    return CountingJit(
        # Replicated out: every process gets the whole batch's probabilities (a few KiB).
        fn,
        in_shardings=(param_shardings, batch_shardings(mesh, fields)),
        out_shardings=replicated(mesh),
    )
