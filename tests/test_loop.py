"""The host loop driven by fake hooks (no model, no jit): metrics fetched one step late, eval/save/log cadence,
the per-phase step cache, stop requests and signals, the non-finite policy, throughput and progress lines."""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest

from jaxft.loop import (
    Cadence,
    LoopHooks,
    NonFiniteError,
    NonFinitePolicy,
    PhaseStep,
    Progress,
    StopRequest,
    is_due,
    run_loop,
)

# ----------------------------------------------------------------------------------------------- fakes


class Probe:
    """A step metric that logs when the host reads it (jax.device_get / np.asarray call __array__), and may advance
    a fake clock then, as waiting for the device would."""

    def __init__(self, events: list, step: int, value: float, clock: list[float] | None):
        self.events, self.step, self.value, self.clock = events, step, value, clock

    def __array__(self, dtype=None, copy=None):
        self.events.append(("read", self.step))
        if self.clock is not None:
            self.clock[0] += 1.0
        return np.asarray(self.value, dtype=dtype)


class FakeRun:
    """A phase's "jitted step": the state is (steps done, tag); it counts one and returns probe metrics."""

    def __init__(self, phase, events, metrics_of, clock, traces):
        self.phase, self.events, self.metrics_of, self.clock, self.traces = phase, events, metrics_of, clock, traces

    def __call__(self, state, batch):
        done, tag = state
        step = done + 1
        self.events.append(("run", step, self.phase, tag, batch["n"]))
        metrics = {k: Probe(self.events, step, v, self.clock) for k, v in self.metrics_of(step).items()}
        return (step, tag), metrics


class Fake:
    """Every hook of the loop, recording what it was called with in `events` (and records, saves)."""

    def __init__(
        self,
        metrics_of=lambda step: {"loss": float(step)},
        phase_at=lambda i: "p",
        stop_at: int | None = None,
        clock: list[float] | None = None,
        save_seconds: float = 0.0,
        leaf_paths=("w",),
        traces: dict | None = None,
    ):
        self.events: list = []
        self.records: list[dict] = []
        self.saves: list = []
        self.built: dict = {}
        self.stop_calls: list[int] = []
        self.batches = 0
        self.metrics_of, self.phase_at_fn, self.stop_at = metrics_of, phase_at, stop_at
        self.clock, self.save_seconds, self.leaf_paths, self.traces = clock, save_seconds, leaf_paths, traces or {}

    def hooks(self) -> LoopHooks:
        return LoopHooks(
            next_batch=self.next_batch,
            phase_at=self.phase_at_fn,
            build_step=self.build_step,
            evaluate=self.evaluate,
            save=self.save,
            write_metrics=self.write_metrics,
            enter_phase=self.enter_phase,
            should_stop=self.should_stop,
        )

    def next_batch(self):
        self.batches += 1
        return {"n": self.batches}

    def build_step(self, phase):
        self.events.append(("build", phase))
        run = FakeRun(phase, self.events, self.metrics_of, self.clock, self.traces.get(phase, 0))
        self.built[phase] = PhaseStep(run, tuple(self.leaf_paths), layout=phase)
        return self.built[phase]

    def enter_phase(self, state, phase_step, step):
        self.events.append(("enter", phase_step.layout, step))
        assert phase_step is self.built[phase_step.layout]  # the cached step of that phase
        return (state[0], phase_step.layout)

    def evaluate(self, state):
        self.events.append(("eval", state[0]))
        return {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_at": float(state[0])}

    def save(self, state, metrics):
        self.events.append(("save", state[0]))
        self.saves.append((state[0], metrics))
        if self.clock is not None:
            self.clock[0] += self.save_seconds

    def write_metrics(self, record):
        self.events.append(("write", record["step"]))
        self.records.append(record)

    def should_stop(self, step):
        self.stop_calls.append(step)
        return "SIGTERM" if step == self.stop_at else ""


def cadence(max_steps, log_every=1, eval_every=0, save_every=0, tokens_per_step=10):
    return Cadence(max_steps, log_every, eval_every, save_every, tokens_per_step)


def run(fake: Fake, cad: Cadence, start_step=0, phase="p", policy=None, tag="t"):
    return run_loop((start_step, tag), start_step, phase, cad, fake.hooks(), policy or NonFinitePolicy("halt", 10))


def evals(fake):
    return [e[1] for e in fake.events if e[0] == "eval"]


def writes(fake):
    return [e[1] for e in fake.events if e[0] == "write"]


def reads(fake):
    return [e[1] for e in fake.events if e[0] == "read"]


# --------------------------------------------------------------------------------------------- is_due


@pytest.mark.parametrize(
    "step, every, max_steps, due",
    [
        (4, 2, 10, True),
        (3, 2, 10, False),
        (10, 3, 10, True),  # the last step is always due
        (9, 3, 10, True),
        (5, 0, 10, False),  # 0: only at the end
        (10, 0, 10, True),
        (4, -1, 10, False),
        (1, 1, 5, True),
        (7, 7, 5, True),
        (6, 4, 7, False),
    ],
)
def test_is_due(step, every, max_steps, due):
    assert is_due(step, every, max_steps) is due


# ------------------------------------------------------------------------------------------ dispatch order


def test_metrics_are_read_one_step_late_and_the_last_step_is_still_written():
    fake = Fake()
    result = run(fake, cadence(4))
    ev = {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_at": 4.0}
    assert fake.events == [
        ("build", "p"),
        ("run", 1, "p", "t", 1),
        ("run", 2, "p", "t", 2),
        ("read", 1),
        ("write", 1),
        ("run", 3, "p", "t", 3),
        ("read", 2),
        ("write", 2),
        ("run", 4, "p", "t", 4),
        ("read", 3),
        ("write", 3),
        ("eval", 4),  # the last step evaluates and saves even with eval_every = save_every = 0
        ("read", 4),
        ("write", 4),
        ("save", 4),
    ]
    assert fake.saves == [(4, ev)]
    assert result.state == (4, "t") and result.eval_metrics == ev and result.stopped_by == ""
    assert fake.stop_calls == [1, 2, 3, 4]


def test_every_step_is_read_but_only_due_steps_are_written():
    fake = Fake(metrics_of=lambda step: {"loss": float(step), "tokens": 99.0, "nonfinite": 0.0, "nonfinite_leaf": -1.0})
    run(fake, cadence(7, log_every=3))
    assert reads(fake) == [s for s in range(1, 8) for _ in range(4)]  # four metrics per step
    assert writes(fake) == [3, 6, 7]
    rec = fake.records[0]
    # counters are not logged; token rates are
    assert sorted(rec) == ["loss", "padding_fraction", "real_tokens_per_sec", "skipped_steps", "step", "tokens_per_sec"]
    assert (rec["step"], rec["loss"], rec["skipped_steps"]) == (3, 3.0, 0)
    last = ["eval_accuracy", "eval_at", "eval_loss", "loss", "padding_fraction", "real_tokens_per_sec"]
    last += ["skipped_steps", "step", "tokens_per_sec"]
    assert sorted(fake.records[-1]) == last


def test_eval_save_and_log_cadence():
    fake = Fake()
    result = run(fake, cadence(12, log_every=5, eval_every=4, save_every=6))
    assert evals(fake) == [4, 8, 12]
    assert [s for s, _ in fake.saves] == [6, 12]
    assert fake.saves[0][1] is None  # a save without an eval at that step carries no metrics
    assert fake.saves[1][1] == {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_at": 12.0}
    assert writes(fake) == [4, 5, 8, 10, 12]  # eval steps are written even off the log cadence
    by_step = {r["step"]: r for r in fake.records}
    assert by_step[4]["eval_at"] == 4.0 and "eval_at" not in by_step[5]
    assert result.eval_metrics["eval_at"] == 12.0
    # a save step reads its own metrics before saving, so the next step has nothing pending
    i = fake.events.index(("save", 6))
    assert fake.events[i - 1 : i + 3] == [("read", 6), ("save", 6), ("run", 7, "p", "t", 7), ("run", 8, "p", "t", 8)]


def test_resume_runs_the_remaining_steps_only():
    fake = Fake()
    result = run(fake, cadence(7), start_step=5)
    assert [e[1] for e in fake.events if e[0] == "run"] == [6, 7]
    assert writes(fake) == [6, 7] and fake.batches == 2
    assert result.state == (7, "t")


def test_nothing_runs_when_already_at_max_steps():
    fake = Fake()
    result = run(fake, cadence(5), start_step=5)
    assert fake.events == [] and fake.batches == 0
    assert (result.state, result.eval_metrics, result.stopped_by, result.traces) == ((5, "t"), {}, "", 0)


# ---------------------------------------------------------------------------------------------- phases


def test_each_phase_is_built_once_and_reused_when_it_recurs():
    phases = ["a", "a", "b", "b", "a", "a"]  # by step index (step - 1)
    fake = Fake(phase_at=lambda i: phases[i], traces={"a": 3, "b": 4})
    result = run(fake, cadence(6, log_every=0), phase="a", tag="a")
    steps = [e for e in fake.events if e[0] in ("build", "enter", "run")]
    assert steps == [
        ("build", "a"),
        ("run", 1, "a", "a", 1),
        ("run", 2, "a", "a", 2),
        ("build", "b"),
        ("enter", "b", 2),  # entered with the index of the first step it trains
        ("run", 3, "b", "b", 3),
        ("run", 4, "b", "b", 4),
        ("enter", "a", 4),  # back to a: no second build
        ("run", 5, "a", "a", 5),
        ("run", 6, "a", "a", 6),
    ]
    assert result.traces == 7  # each phase's step counted once
    assert result.state == (6, "a")


def test_a_state_of_another_phase_enters_the_first_steps_phase():
    fake = Fake(phase_at=lambda i: "late")
    result = run(fake, cadence(2), phase="early", tag="early")
    assert [e for e in fake.events if e[0] in ("build", "enter", "run")] == [
        ("build", "late"),
        ("enter", "late", 0),
        ("run", 1, "late", "late", 1),
        ("run", 2, "late", "late", 2),
    ]
    assert result.state == (2, "late")


def test_phase_step_traces_reads_the_runs_count():
    class Counted:
        traces = 5

    assert PhaseStep(Counted(), ("w",)).traces == 5
    assert PhaseStep(lambda s, b: (s, {}), ("w",)).traces == 0


# ----------------------------------------------------------------------------------------- stop requests


def test_a_stop_request_saves_that_step_and_returns():
    fake = Fake(stop_at=2)
    result = run(fake, cadence(5, log_every=0))
    assert result.stopped_by == "SIGTERM" and result.state == (2, "t")
    assert fake.events[-4:] == [("run", 2, "p", "t", 2), ("read", 1), ("read", 2), ("save", 2)]
    assert fake.saves == [(2, None)] and evals(fake) == []
    assert fake.stop_calls == [1, 2] and fake.batches == 2


@pytest.fixture
def sentinel_handlers():
    """SIGINT/SIGTERM handlers that only record, so a signal StopRequest missed cannot end the test session."""
    caught = []
    handler = lambda signum, frame: caught.append(signum)
    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler, caught
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _send(sig, stop: StopRequest | None = None) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(200):  # the handler runs in the main thread at the next bytecode; bounded wait anyway
        if stop is None or stop.signal:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_stop_request_records_the_signal_and_restores_handlers(sentinel_handlers, caplog, sig, name):
    handler, caught = sentinel_handlers
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) is not handler and signal.getsignal(signal.SIGINT) is not handler
        assert stop(3) == ""
        with caplog.at_level(logging.WARNING, logger="jaxft.loop"):
            _send(sig, stop)
        assert stop(3) == name and stop.signal == name
    assert caught == []
    assert f"{name} received: finishing this step, saving, then stopping" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_sigint_after_a_stop_request_interrupts_at_once(sentinel_handlers, first):
    handler, caught = sentinel_handlers
    with StopRequest() as stop:
        _send(first, stop)
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
            time.sleep(0.5)  # only reached if the interrupt did not come
    assert caught == [] and signal.getsignal(signal.SIGINT) is handler


def test_a_second_sigterm_does_not_interrupt(sentinel_handlers):
    with StopRequest() as stop:
        _send(signal.SIGTERM, stop)
        _send(signal.SIGTERM)
        assert stop(1) == "SIGTERM"


# ----------------------------------------------------------------------------------------- non-finite


def bad(loss=float("nan"), leaf=1.0):
    return {"loss": loss, "nonfinite": 1.0, "nonfinite_leaf": leaf}


GOOD = {"loss": 0.5, "nonfinite": 0.0, "nonfinite_leaf": -1.0}


def test_halt_raises_at_the_first_non_finite_step_naming_step_loss_and_leaf():
    policy = NonFinitePolicy("halt", 10)
    policy.observe(6, GOOD, ["emb", "head"])
    with pytest.raises(NonFiniteError) as e:
        policy.observe(7, bad(), ["emb", "head"])
    assert str(e.value) == (
        "step 7: non-finite training (loss=nan, first non-finite gradient: head); the update was not applied; "
        "halting (train.nonfinite=halt)"
    )
    assert policy.skipped == 1


def test_a_non_finite_loss_with_finite_gradients_says_so():
    with pytest.raises(NonFiniteError, match=r"^step 2: non-finite training \(loss=inf, gradients finite\);"):
        NonFinitePolicy("halt", 10).observe(2, bad(loss=float("inf"), leaf=-1.0), ["w"])


def test_skip_counts_and_halts_after_max_consecutive(caplog):
    policy = NonFinitePolicy("skip", 3, skipped=4)  # 4 skipped before a resume
    with caplog.at_level(logging.WARNING, logger="jaxft.loop"):
        policy.observe(1, bad(), ["a", "b"])
        policy.observe(2, bad(), ["a", "b"])
        assert (policy.skipped, policy.consecutive) == (6, 2)
        policy.observe(3, GOOD, ["a", "b"])  # a finite step resets the run of bad ones, not the count
        assert (policy.skipped, policy.consecutive) == (6, 0)
        policy.observe(4, bad(), ["a", "b"])
        policy.observe(5, bad(), ["a", "b"])
        with pytest.raises(NonFiniteError) as e:
            policy.observe(6, bad(leaf=0.0), ["a", "b"])
    assert str(e.value) == (
        "step 6: non-finite training (loss=nan, first non-finite gradient: a); the update was not applied; "
        "3 non-finite steps in a row reached train.max_nonfinite_steps, halting"
    )
    assert policy.skipped == 9
    assert "step 1: non-finite training (loss=nan, first non-finite gradient: b); the update was not applied; " in (
        caplog.text
    )
    assert "skipped (2 in a row)" in caplog.text


def test_metrics_without_a_nonfinite_flag_are_finite():
    policy = NonFinitePolicy("halt", 1)
    policy.observe(1, {"loss": float("nan")}, ["w"])  # no flag: the step does not report non-finite
    assert (policy.skipped, policy.consecutive) == (0, 0)


def test_the_loop_halts_before_saving_a_non_finite_step():
    fake = Fake(metrics_of=lambda step: bad() if step == 2 else GOOD, leaf_paths=("enc/w", "head/b"))
    with pytest.raises(NonFiniteError, match=r"^step 2: .*first non-finite gradient: head/b\); .*halting"):
        run(fake, cadence(5, save_every=2))
    assert fake.saves == [] and max(e[1] for e in fake.events if e[0] == "run") == 2


def test_the_loop_skips_non_finite_steps_and_logs_the_count():
    fake = Fake(metrics_of=lambda step: bad() if step in (2, 3) else {**GOOD, "loss": float(step)}, leaf_paths="ab")
    result = run(fake, cadence(5), policy=NonFinitePolicy("skip", 3, skipped=1))
    assert [r["skipped_steps"] for r in fake.records] == [1, 2, 3, 3, 3]
    assert all("nonfinite" not in r and "nonfinite_leaf" not in r for r in fake.records)
    assert result.state == (5, "t") and [s for s, _ in fake.saves] == [5]


# ------------------------------------------------------------------------------------ throughput, progress


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter that moves only when the host waits on a metric (1 s) or a save (10 s)."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return now


def test_tokens_per_sec_covers_the_interval_since_the_last_record_without_save_time(clock):
    fake = Fake(clock=clock, save_seconds=10.0)
    run(fake, cadence(5, save_every=3, tokens_per_step=10))
    assert [(r["step"], r["tokens_per_sec"]) for r in fake.records] == [(s, 10.0) for s in range(1, 6)]


def test_tokens_per_sec_over_several_steps(clock):
    fake = Fake(clock=clock)
    run(fake, cadence(6, log_every=3, tokens_per_step=7))
    # step 3 is read at t=3 (3 steps of 7 tokens since t=0), step 6 at t=6
    assert [(r["step"], r["tokens_per_sec"]) for r in fake.records] == [(3, 7.0), (6, 7.0)]


def test_progress_prints_one_line_per_record_without_a_tty(clock, capsys):
    fake = Fake(metrics_of=lambda step: {"loss": float(step), "learning_rate": 0.001}, clock=clock)
    run(fake, cadence(2))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "step 1: loss=1 learning_rate=0.001 tokens_per_sec=5",
        "step 2: loss=2 learning_rate=0.001 tokens_per_sec=5 eval_loss=0.5 eval_accuracy=0.75",
    ]


def test_progress_show_formats_eval_only_records(capsys):
    p = Progress(0, 10)
    p.show({"step": 4, "eval_loss": 0.123456, "eval_accuracy": 0.5})
    p.advance()
    p.close()
    assert capsys.readouterr().out == "step 4: eval_loss=0.1235 eval_accuracy=0.5\n"
