"""The host loop: dispatch steps, fetch metrics one step late, eval and save on cadence, freeze phases, signals,
progress output.

It never computes on the host what the device can, and never blocks on step N before dispatching N+1. It imports
nothing from jaxft: everything it runs arrives as a hook.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jaxft.loop")


@dataclasses.dataclass(frozen=True)
class PhaseStep:
    """The jitted train step of one freeze phase, and what the loop needs to say about it."""

    run: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]
    leaf_paths: tuple[str, ...]  # the trainable leaves in jax.tree.leaves order: names a non-finite gradient
    layout: Any = None  # the phase's state layout, for enter_phase; opaque to the loop

    @property
    def traces(self) -> int:
        return getattr(self.run, "traces", 0)


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What the loop calls; each is a small function built by train()."""

    next_batch: Callable[[], dict[str, jax.Array]]
    phase_at: Callable[[int], Hashable]  # the freeze phase step index i trains in (a function of i alone)
    build_step: Callable[[Hashable], PhaseStep]  # a phase's jitted step: built once per phase, then cached
    evaluate: Callable[[Any], dict[str, float]]
    save: Callable[[Any, dict[str, float] | None], None]
    write_metrics: Callable[[dict[str, Any]], None]
    # (state, the new phase's step, step index) -> the state moved into that phase's partition (gradual unfreezing)
    enter_phase: Callable[[Any, PhaseStep, int], Any] = lambda state, phase_step, step: state
    should_stop: Callable[[int], str] = lambda step: ""  # a signal's name once a stop was requested
    # (step, its eval metrics) -> a reason to stop the run after this step (early stopping), or ""
    after_eval: Callable[[int, dict[str, float]], str] = lambda step, metrics: ""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient and the policy says stop."""


class NonFinitePolicy:
    """`halt`: stop at the first non-finite step. `skip`: the step already dropped its update; stop after
    `max_consecutive` in a row. Steps that hit it are counted in `skipped` (carried across resumes)."""

    def __init__(self, mode: str, max_consecutive: int, skipped: int = 0):
        self.mode, self.max_consecutive = mode, max_consecutive
        self.skipped, self.consecutive = skipped, 0

    def observe(self, step: int, host: dict[str, float], leaf_paths: Sequence[str]) -> None:
        """Step `step`'s fetched metrics; `leaf_paths` name the trainable leaves of the phase it ran in."""
        if not host.get("nonfinite"):
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        leaf = int(host.get("nonfinite_leaf", -1))
        where = f"first non-finite gradient: {leaf_paths[leaf]}" if leaf >= 0 else "gradients finite"
        what = f"step {step}: non-finite training (loss={host['loss']}, {where}); the update was not applied"
        if self.mode == "halt":
            raise NonFiniteError(f"{what}; halting (train.nonfinite=halt)")
        log.warning("%s; skipped (%d in a row)", what, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{what}; {self.consecutive} non-finite steps in a row reached train.max_nonfinite_steps, halting"
            )


class EarlyStopping:
    """Counts the evals since `metric` last improved by more than `min_delta`; once `patience` evals in a row
    did not, the run stops. Its state goes into every checkpoint, so a resumed run counts on."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float, state: dict[str, Any] | None = None):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        state = state or {}
        self.best = state.get("best")
        self.best_step = int(state.get("best_step", 0))
        self.bad_evals = int(state.get("bad_evals", 0))
        # A run that stopped early stays stopped, unless resumed with a larger patience (--allow-config-change).
        self.stopped_at = int(state.get("stopped_at", 0)) if patience and self.bad_evals >= patience else 0

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_at": self.stopped_at,
        }

    def observe(self, step: int, metrics: dict[str, float]) -> str:
        """After the eval at `step`: a one-line reason when the run should stop now, else ""."""
        if not self.patience or self.metric not in metrics:
            return ""
        value = float(metrics[self.metric])
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return ""
        self.bad_evals += 1
        if self.bad_evals < self.patience:
            return ""
        self.stopped_at = step
        return self.reason()

    def reason(self) -> str:
        evals = "eval" if self.patience == 1 else "evals"
        return (
            f"stopped early at step {self.stopped_at}: {self.metric} did not improve for {self.patience} {evals} "
            f"(best {self.best:.4g} at step {self.best_step})"
        )


class StopRequest:
    """SIGTERM or SIGINT asks the loop to finish the current step, save and return; a second SIGINT
    interrupts at once. On several hosts, JAX's preemption sync point picks a step all processes agree on
    (it owns SIGTERM there), so every process saves the same step."""

    def __init__(self):
        self.signal = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        wanted = [signal.SIGINT] if jax.process_count() > 1 else [signal.SIGTERM, signal.SIGINT]
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving, then stopping", self.signal)

    def __call__(self, step: int) -> str:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return "SIGTERM"
            except RuntimeError:  # no preemption service in this JAX setup
                pass
            return ""  # a local SIGINT alone cannot be agreed on: it interrupts (second Ctrl-C)
        return self.signal


@dataclasses.dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    eval_every: int
    save_every: int
    tokens_per_step: int  # the step's size when its metrics do not say (tokens; images for image tasks)
    save_at_eval: bool = False  # early stopping: every eval saves too, so the best eval has its checkpoint
    unit: str = "tokens"  # what a step's size counts: "tokens" (with padding figures) or "images"


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
                for k in ("loss", "learning_rate", "tokens_per_sec", "images_per_sec", "eval_loss", "eval_accuracy")
                if k in record
            ]
            print(f"step {record['step']}: " + " ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Emitter:
    """Turns step metrics into records: fetched late, with tokens/s over the interval since the last one."""

    def __init__(
        self, cadence: Cadence, start_step: int, hooks: LoopHooks, progress: Progress, nonfinite: NonFinitePolicy
    ):
        self.cadence, self.hooks, self.progress, self.nonfinite = cadence, hooks, progress, nonfinite
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.padded, self.real = 0.0, 0.0  # tokens of the steps since the last record: all, and not padding

    def emit(self, ran: Ran, extra: dict[str, float] | None = None) -> None:
        # Every step's scalars are read (one step late) so a non-finite step is never missed.
        step = ran.step
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(ran.metrics).items()}
        self.nonfinite.observe(step, host, ran.leaf_paths)
        self.real += host.pop("tokens", 0.0)
        self.padded += host.pop("padded_tokens", self.cadence.tokens_per_step)
        if not (extra or is_due(step, self.cadence.log_every, self.cadence.max_steps)):
            return
        for k in ("nonfinite", "nonfinite_leaf"):
            host.pop(k, None)
        host["skipped_steps"] = self.nonfinite.skipped
        seconds = max(time.perf_counter() - self.last_time, 1e-9)
        if self.cadence.unit == "tokens":
            rates = {
                "tokens_per_sec": self.padded / seconds,  # every token the step computed on, padding included
                "real_tokens_per_sec": self.real / seconds,
                "padding_fraction": 1.0 - self.real / max(self.padded, 1.0),
            }
        else:
            rates = {f"{self.cadence.unit}_per_sec": self.padded / seconds}
        record = {"step": step, **host, **rates, **(extra or {})}
        self.last_time, self.last_step = time.perf_counter(), step
        self.padded, self.real = 0.0, 0.0
        self.hooks.write_metrics(record)
        self.progress.show(record)

    def restart_clock(self, step: int) -> None:
        # Eval and save time is not training throughput.
        self.last_time, self.last_step = time.perf_counter(), step
        self.padded, self.real = 0.0, 0.0


@dataclasses.dataclass(frozen=True)
class Ran:
    """A dispatched step whose metrics are not fetched yet."""

    step: int
    metrics: dict[str, jax.Array]
    leaf_paths: Sequence[str]


@dataclasses.dataclass
class LoopResult:
    state: Any
    eval_metrics: dict[str, float]
    stopped_by: str = ""  # a signal's name, or early stopping's reason, when the run stopped early (after saving)
    traces: int = 0  # how often the train step was traced, over every phase


def run_loop(
    state: Any, start_step: int, phase: Hashable, cadence: Cadence, hooks: LoopHooks, nonfinite: NonFinitePolicy
) -> LoopResult:
    """Runs steps start_step+1 … max_steps, or until a stop is requested (then saves that step). `phase` is the
    freeze phase `state` is partitioned for; each step first moves the state into the phase of its index."""
    progress = Progress(start_step, cadence.max_steps)
    emitter = _Emitter(cadence, start_step, hooks, progress, nonfinite)
    steps: dict[Hashable, PhaseStep] = {}  # every phase's jitted step, built when the phase is first reached
    pending: Ran | None = None
    last_eval: dict[str, float] = {}
    stopped_by = ""
    try:
        for step in range(start_step + 1, cadence.max_steps + 1):
            entering, phase = hooks.phase_at(step - 1) != phase, hooks.phase_at(step - 1)
            if phase not in steps:
                steps[phase] = hooks.build_step(phase)
            if entering:
                state = hooks.enter_phase(state, steps[phase], step - 1)
            state, metrics = steps[phase].run(state, hooks.next_batch())
            # Fetch the previous step's metrics only now, after this step is queued: the device never idles.
            if pending is not None:
                emitter.emit(pending)
            pending = Ran(step, metrics, steps[phase].leaf_paths)
            progress.advance()
            stopped_by = hooks.should_stop(step)
            do_eval = is_due(step, cadence.eval_every, cadence.max_steps)
            if do_eval:
                last_eval = hooks.evaluate(state)
                reason = hooks.after_eval(step, last_eval)
                stopped_by = stopped_by or (reason if step < cadence.max_steps else "")
            do_save = is_due(step, cadence.save_every, cadence.max_steps) or bool(stopped_by)
            do_save = do_save or (do_eval and cadence.save_at_eval)
            if do_eval or do_save:
                emitter.emit(pending, last_eval if do_eval else None)  # a halting step is never saved
                pending = None
                if do_save:
                    hooks.save(state, last_eval if do_eval else None)
                emitter.restart_clock(step)
            if stopped_by.startswith("stopped early"):
                log.info("%s; checkpoint saved", stopped_by)
                break
            if stopped_by:
                log.warning(
                    "stopped at step %d by %s; checkpoint saved; run the same command to resume", step, stopped_by
                )
                break
    finally:
        progress.close()
    return LoopResult(state, last_eval, stopped_by, sum(s.traces for s in steps.values()))


def is_due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)
