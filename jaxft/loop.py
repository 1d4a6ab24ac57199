"""The host loop: dispatch steps, fetch metrics one step late, eval and save on cadence, progress output.

It never computes on the host what the device can, and never blocks on step N before dispatching N+1.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jaxft.loop")


@dataclasses.dataclass
class LoopHooks:
    """What the loop calls; each is a small function built by train()."""

    next_batch: Callable[[], dict[str, jax.Array]]
    train_step: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    evaluate: Callable[[Any], dict[str, float]]
    save: Callable[[Any, dict[str, float] | None], None]
    write_metrics: Callable[[dict[str, Any]], None]
    before_step: Callable[[Any, int], Any] = lambda state, step: state  # gradual unfreezing re-partitions here


@dataclasses.dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    eval_every: int
    save_every: int
    tokens_per_step: int


class Progress:
    """tqdm bar with ETA on a TTY; plain log lines otherwise."""

    def __init__(self, start: int, total: int):
        self.bar = None
        self.main = jax.process_index() == 0
        if sys.stderr.isatty() and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
            if "eval_accuracy" in record:
                self.bar.write(
                    f"step {record['step']}: eval_loss={record['eval_loss']:.4f} "
                    f"eval_accuracy={record['eval_accuracy']:.4f}"
                )
        elif self.main:
            parts = [
                f"{k}={record[k]:.4g}"
                for k in ("loss", "learning_rate", "tokens_per_sec", "eval_loss", "eval_accuracy")
                if k in record
            ]
            print(f"step {record['step']}: " + " ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Emitter:
    """Turns step metrics into records: fetched late, with tokens/s over the interval since the last one."""

    def __init__(self, cadence: Cadence, start_step: int, hooks: LoopHooks, progress: Progress):
        self.cadence, self.hooks, self.progress = cadence, hooks, progress
        self.last_time, self.last_step = time.perf_counter(), start_step

    def emit(self, step: int, metrics: dict[str, jax.Array], extra: dict[str, float] | None = None) -> None:
        if not (extra or _due(step, self.cadence.log_every, self.cadence.max_steps)):
            return
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        host.pop("tokens", None)
        now = time.perf_counter()
        tokens = self.cadence.tokens_per_step * (step - self.last_step)
        record = {"step": step, **host, "tokens_per_sec": tokens / max(now - self.last_time, 1e-9), **(extra or {})}
        self.last_time, self.last_step = now, step
        self.hooks.write_metrics(record)
        self.progress.show(record)

    def restart_clock(self, step: int) -> None:
        # Eval and save time is not training throughput.
        self.last_time, self.last_step = time.perf_counter(), step


def run_loop(state: Any, start_step: int, cadence: Cadence, hooks: LoopHooks) -> tuple[Any, dict[str, float]]:
    """Runs steps start_step+1 … max_steps; returns the final state and the last eval metrics."""
    progress = Progress(start_step, cadence.max_steps)
    emitter = _Emitter(cadence, start_step, hooks, progress)
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last_eval: dict[str, float] = {}
    for step in range(start_step + 1, cadence.max_steps + 1):
        state = hooks.before_step(state, step - 1)
        state, metrics = hooks.train_step(state, hooks.next_batch())
        # Fetch the previous step's metrics only now, after this step is queued: the device never idles.
        if pending is not None:
            emitter.emit(*pending)
        pending = (step, metrics)
        progress.advance()
        do_eval = _due(step, cadence.eval_every, cadence.max_steps)
        do_save = _due(step, cadence.save_every, cadence.max_steps)
        if do_eval or do_save:
            if do_eval:
                last_eval = hooks.evaluate(state)
            emitter.emit(step, metrics, last_eval if do_eval else None)
            pending = None
            if do_save:
                hooks.save(state, last_eval or None)
            emitter.restart_clock(step)
    progress.close()
    return state, last_eval


def _due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)
