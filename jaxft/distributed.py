"""Joining the other processes of a run before anything touches devices: launch flags, JAX's environment
variables or JAX's own cluster detection; gloo collectives on CPU; one line, not a C++ stack trace, when JAX's
distributed service stops a process; the same command on every process, checked.

It owns process startup and output hygiene only; what each process reads and computes is the data and setup
stages' job (their results do not depend on the process count).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("jaxft.distributed")

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
DEVICE_IDS_ENV = "JAX_LOCAL_DEVICE_IDS"
DEFAULT_INIT_TIMEOUT = 300  # JAX's default wait for the coordinator and every process to join
DEFAULT_PEER_TIMEOUT = 100  # JAX's default heartbeat timeout: a silent process is lost after this long
SHUTDOWN_WAIT = 30  # after an error, how long a process waits for the others at JAX's shutdown barrier


class DistributedError(ValueError):
    """A launch that cannot form one run: a partial or bad set of flags, or processes that disagree."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run. `coordinator` None: JAX's cluster detection fills every field in."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None
    init_timeout: int = DEFAULT_INIT_TIMEOUT
    peer_timeout: int = DEFAULT_PEER_TIMEOUT


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (default: JAX_COORDINATOR_ADDRESS etc., or JAX's cluster detection)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same on every process")
    g.add_argument("--num-processes", metavar="N", help="how many processes take part")
    g.add_argument("--process-id", metavar="I", help="this process's index, 0 … N-1")
    g.add_argument("--local-device-ids", metavar="IDS", help="this process's devices, e.g. 0 or 0,1 (one GPU each)")
    g.add_argument(
        "--init-timeout", type=int, default=DEFAULT_INIT_TIMEOUT, metavar="S", help="seconds to wait for all to join"
    )
    g.add_argument(
        "--peer-timeout",
        type=int,
        default=DEFAULT_PEER_TIMEOUT,
        metavar="S",
        help="seconds without a heartbeat before a process counts as lost and the others stop",
    )


def resolve_launch(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch the flags (else the JAX_* variables) describe; a cluster JAX detects; or None: one process."""
    given = {k: getattr(args, k, None) for k in ENV}
    source = "flags"
    if all(v is None for v in given.values()):
        given, source = {k: env.get(name) or None for k, name in ENV.items()}, "environment"
    timeouts = _timeouts(args)
    device_ids = _device_ids(getattr(args, "local_device_ids", None) or env.get(DEVICE_IDS_ENV))
    if all(v is None for v in given.values()):
        if _cluster_detected(env):
            return Launch(None, None, None, device_ids, *timeouts)
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        names = [f"--{k.replace('_', '-')}" if source == "flags" else ENV[k] for k in missing]
        raise DistributedError(
            f"several processes need a coordinator, a process count and an id: {', '.join(names)} missing"
        )
    num, pid = (
        _integer(given["num_processes"], "the process count", 1),
        _integer(given["process_id"], "the process id", 0),
    )
    if pid >= num:
        raise DistributedError(f"process id {pid} is not below the process count {num} (ids run 0 … {num - 1})")
    coordinator = str(given["coordinator"])
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    if num == 1:
        return None
    return Launch(coordinator, num, pid, device_ids, *timeouts)


def _timeouts(args: argparse.Namespace) -> tuple[int, int]:
    out = []
    for name, default in (("init_timeout", DEFAULT_INIT_TIMEOUT), ("peer_timeout", DEFAULT_PEER_TIMEOUT)):
        value = getattr(args, name, None)
        value = default if value is None else value
        if value < 1:
            raise DistributedError(f"--{name.replace('_', '-')}: {value} must be at least 1 second")
        out.append(int(value))
    return out[0], out[1]


def _integer(value: Any, what: str, least: int) -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise DistributedError(f"{what} {value!r} is not an integer") from None
    if n < least:
        raise DistributedError(f"{what} {n} must be at least {least}")
    return n


def _device_ids(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise DistributedError(f"local device ids {value!r}: expected integers separated by commas") from None


def _cluster_detected(env: Mapping[str, str]) -> bool:
    """A multi-process cluster JAX detects itself, told by variables its launchers set (JAX reads the rest)."""
    tpu_pod = env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    slurm = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1
    open_mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    kubernetes = "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
    return tpu_pod or slurm or open_mpi or kubernetes


# ------------------------------------------------------------------------------------------------ joining


def join(launch: Launch, command: str) -> None:
    """Joins the run: the output filter first (it must fork before JAX starts threads), then gloo collectives
    for the CPU backend and jax.distributed. Non-zero processes print warnings and errors only."""
    control = start_output_filter(launch, command)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        launch.coordinator,
        launch.num_processes,
        launch.process_id,
        list(launch.local_device_ids) if launch.local_device_ids else None,
        initialization_timeout=launch.init_timeout,
        heartbeat_timeout_seconds=launch.peer_timeout,
        shutdown_timeout_seconds=SHUTDOWN_WAIT,
    )
    index = jax.process_index()
    if control is not None:
        sys.stderr.flush()
        os.write(control, f"{_CONTROL}{index}\n".encode())
    if index != 0:
        logging.getLogger("jaxft").setLevel(logging.WARNING)


def check_same_command(fingerprint: Any) -> None:
    """Every process must run the same command (the resolved config, the run dir, the options): a hash of
    `fingerprint` is gathered from all, and each process raises the same one-line error if any differs."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        who = f"process {differ[0]} was" if len(differ) == 1 else f"processes {', '.join(map(str, differ))} were"
        raise DistributedError(
            f"{who} started with another command or config than process 0 (every process must run the same jaxft "
            "command)"
        )


def leave_after_error() -> None:
    """After a one-line error: wait (at most SHUTDOWN_WAIT s) for the others at JAX's shutdown barrier, so
    that a process 0 leaving first does not take the others down before they print their own error."""
    import jax

    if not jax.distributed.is_initialized():
        return
    done = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    done.start()
    done.join(SHUTDOWN_WAIT + 5)


# ---------------------------------------------------------------------------------------- output filter

_CONTROL = "\x00jaxft-process-id="
# Lines libraries print on every process that a user can do nothing about.
_NOISE = re.compile(
    # gloo's "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7", one per
    # device at start-up: the devices' threads write them at once, so a line can hold pieces of two ("[Gloo] Rank
    # [Gloo] Rank 1 is ...") and the next line the rest of one. Any line with either end of the message goes.
    r"^.*(\[Gloo\] Rank|connected peer ranks is : \d+$)|"
    r"^[IW]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|preemption_notifier|client|distributed)\.(cc|h):\d+\]"
)
_HELD = re.compile(r"^E\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client|distributed)\.(cc|h):\d+\]")
# JAX's fatal log line, or a C++ exception nothing caught (gloo's, when a peer dies inside a collective).
_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ \S+:\d+\] (.*)|^(terminate called after throwing an instance of .*)")


def start_output_filter(launch: Launch, command: str) -> int | None:
    """Routes this process's stdout and stderr through a small forked process that drops library noise,
    prefixes other processes' lines with `[process i]`, keeps their stdout quiet, and turns JAX's fatal
    distributed errors (which end the process with a C++ stack trace) into one `jaxft: error:` line.
    Returns the control descriptor that tells it the process index once known."""
    sys.stdout.flush()
    sys.stderr.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    real_out, real_err = os.dup(1), os.dup(2)
    if os.fork() == 0:  # the filter: it lives until this process's last write end closes
        os.close(out_w)
        os.close(err_w)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            filter_streams(out_r, err_r, real_out, real_err, launch, command)
        finally:
            os._exit(0)
    os.close(out_r)
    os.close(err_r)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    os.close(real_out)
    os.close(real_err)
    sys.stdout.reconfigure(line_buffering=True)
    return 2


def filter_streams(out_r: int, err_r: int, real_out: int, real_err: int, launch: Launch, command: str) -> None:
    """The filter's loop: reads a process's stdout and stderr (`out_r`, `err_r`) until both close and writes
    what a user should see to `real_out` and `real_err`."""
    state = _FilterState(launch.process_id, real_out, real_err)
    buffers = {out_r: b"", err_r: b""}
    while buffers:
        ready, _, _ = select.select(list(buffers), [], [], _HELD_FOR if state.held else None)
        if state.held and time.monotonic() - state.held_since > _HELD_FOR:
            state.release()
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                if buffers[fd]:
                    state.line(buffers[fd].decode(errors="replace"), fd == out_r)
                del buffers[fd]
                continue
            *lines, buffers[fd] = (buffers[fd] + chunk).split(b"\n")
            for raw in lines:
                state.line(raw.decode(errors="replace"), fd == out_r)
    if state.fatal:
        message = fatal_message(state.fatal, launch, command, state.index)
        os.write(real_err, (state.prefix() + message + "\n").encode())
    else:
        state.release()


_HELD_FOR = 2.0  # seconds an error logged by JAX's coordination service waits for the fatal line that follows it


class _FilterState:
    """Line by line: noise dropped; an error of JAX's coordination service held back (its message spans
    lines) until the fatal line that usually follows, else shown; everything after a fatal line kept for
    fatal_message."""

    def __init__(self, index: int | None, real_out: int, real_err: int):
        self.index = index  # the process index (None until JAX says, for a detected cluster)
        self.real_out, self.real_err = real_out, real_err
        self.fatal = ""
        self.held: list[str] = []
        self.held_since = 0.0

    def prefix(self) -> str:
        return f"[process {self.index}] " if self.index else ""

    def release(self) -> None:
        held, self.held = self.held, []
        for text in held:
            self.show(text, False)

    def line(self, text: str, is_stdout: bool) -> None:
        if text.startswith(_CONTROL):
            self.index = int(text[len(_CONTROL) :])
        elif self.fatal:  # everything after JAX's fatal log line is its message and stack trace
            self.fatal += "\n" + text
        elif match := _FATAL.match(text):
            self.fatal, self.held = match.group(1) or match.group(2), []
        elif _HELD.match(text) or (self.held and not is_stdout):
            self.held_since = self.held_since if self.held else time.monotonic()
            self.held.append(text)
        elif not _NOISE.match(text):
            self.show(text, is_stdout)

    def show(self, text: str, is_stdout: bool) -> None:
        if is_stdout:
            if not self.index:
                os.write(self.real_out, (text + "\n").encode())
            return
        os.write(self.real_err, (self.prefix() + text + "\n").encode())


def fatal_message(text: str, launch: Launch, command: str, index: int | None = None) -> str:
    """One line for the fatal error JAX's distributed service (or a collective) stopped process `index` with."""
    after = (
        "; the last committed checkpoint is intact: start every process again to resume" if command == "train" else ""
    )
    lost = re.search(r"stopped sending heartbeats\):\s*([\d,\s]+)", text)
    if lost:
        ids = ", ".join(re.findall(r"\d+", lost.group(1)))
        return f"jaxft: error: lost process {ids}: no heartbeat for {launch.peer_timeout} s (--peer-timeout){after}"
    if "RegisterTask" in text or "DEADLINE_EXCEEDED" in text and "Connect" in text:
        where = launch.coordinator or "the cluster's coordinator"
        return (
            f"jaxft: error: could not join the coordinator at {where} within {launch.init_timeout} s "
            "(--init-timeout): is every process started, with the same --coordinator and --num-processes?"
        )
    if "leader task" in text or "Failed to send RPC to coordination service" in text:
        return f"jaxft: error: lost the coordinator (process 0){after}"
    if "gloo" in text:  # a peer died inside a collective: with two processes it can only be the other one
        reason = (re.findall(r"what\(\):\s*(?:\[[^\]]*\]\s*)?(.*)", text) or ["the collective failed"])[0]
        who = f"process {1 - index}" if launch.num_processes == 2 and index in (0, 1) else "another process"
        return f"jaxft: error: lost {who}: a collective with it failed ({reason.strip()[:200]}){after}"
    status = re.search(r"absl::Status: ([^\n]*)", text)
    reason = status.group(1) if status else (text.splitlines() or [""])[0]
    return f"jaxft: error: JAX's distributed service stopped this process: {reason[:300]}{after}"
