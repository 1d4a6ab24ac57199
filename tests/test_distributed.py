"""Several processes: 2 × 4 CPU devices on 127.0.0.1 equal 1 × 8 (training with dropout, LoRA SFT with packing,
image classification with mixup and cutmix, eval, predict, export, generate); SIGTERM to all or one saves one
agreed step; SIGKILL of one stops the other within the peer timeout; resume across process counts; bad launches
are one line on every process.

Every process here has a deadline and is killed at the end; no address but 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jaxft import distributed
from jaxft.distributed import DistributedError, Launch
from jaxft.evaluate import eval_run
from jaxft.export import export_run
from jaxft.generate import generate_run
from jaxft.predict import predict_file
from tests.fixtures import (
    ROOT,
    SFT,
    SFT_ARGS,
    metrics_records,
    run_params,
    save_tiny_bert,
    save_tiny_chat_model,
    save_tiny_vit,
    train_in_process,
    write_image_folder,
    write_rows,
    write_vit_config,
)

DEADLINE = 420  # seconds any one process may run
STEPS = 240  # long enough that a signal sent at step 20 lands mid-run
# The default job's recipe (dropout on) on a tiny BERT, with every step logged.
RECIPE = [
    f"train.max_steps={STEPS}",
    "train.batch_size=16",
    "train.eval_every_steps=120",
    "train.eval_batch_size=16",
    "train.log_every_steps=1",
    "checkpoint.every_steps=40",
    "checkpoint.keep=10",
    "data.max_length=16",
    # The default job freezes the embeddings and the first half of the layers: here 1 of the tiny model's 2.
    'freeze.rules=[["embeddings/.*", "freeze"], ["encoder/layers/0/.*", "freeze"], [".*", "train"]]',
]


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Procs:
    """`python -m jaxft.cli ARGS` on `n` processes of 8/n CPU devices each, joined over 127.0.0.1."""

    def __init__(self, args: list, n: int = 2, extra: dict[int, list] | None = None, env: dict | None = None):
        address = free_address()
        base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}", **(env or {})}
        self.procs, self.files = [], []
        for i in range(n):
            launch = ["--coordinator", address, "--num-processes", str(n), "--process-id", str(i)] if n > 1 else []
            cmd = [sys.executable, "-m", "jaxft.cli", *map(str, args), *launch, *map(str, (extra or {}).get(i, []))]
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            self.files.append((out, err))
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=base, stdout=out, stderr=err, text=True))
        self.started = time.monotonic()

    def signal(self, which: list[int], sig: int) -> None:
        for i in which:
            self.procs[i].send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) per process; any still running at the deadline is killed."""
        try:
            for p in self.procs:
                p.wait(max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        results = []
        for p, (out, err) in zip(self.procs, self.files):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def ok(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    assert [r[0] for r in results] == [0] * len(results), "\n\n".join(r[2][-3000:] for r in results)
    return results


def wait_for_step(run_dir: Path, step: int, procs: Procs, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = metrics_records(run_dir)
        if records and records[-1]["step"] >= step:
            return
        if any(p.poll() is not None for p in procs.procs):
            pytest.fail("a process ended before step %d: %s" % (step, [p.returncode for p in procs.procs]))
        time.sleep(0.2)
    pytest.fail(f"no step {step} within {timeout} s")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir) if "loss" in r}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Logged losses within 1e-5 and final weights within 1e-4 of the reference run (only the reduction order
    may differ)."""
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5
    evals = [
        {k: v for k, v in r.items() if k.startswith("eval_")} for r in metrics_records(run_dir) if "eval_loss" in r
    ]
    wanted = [
        {k: v for k, v in r.items() if k.startswith("eval_")} for r in metrics_records(reference) if "eval_loss" in r
    ]
    assert len(evals) == len(wanted)
    for a, b in zip(evals, wanted):
        assert a.keys() == b.keys() and a.get("eval_confusion") == b.get("eval_confusion")
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a if k != "eval_confusion")
    a, b = run_params(run_dir), run_params(reference)
    assert a.keys() == b.keys()
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) < 1e-4


@pytest.fixture(scope="module")
def job(tmp_path_factory, data_dir) -> dict:
    """The default job's recipe on a tiny BERT and a small review file, and its 1 × 8 run (in this process)."""
    tmp = tmp_path_factory.mktemp("distributed")
    model = save_tiny_bert(tmp / "model")
    train_file, eval_file = write_rows(tmp / "train.jsonl", 64), write_rows(tmp / "eval.jsonl", 24, start=100)
    data = [f"model.source={model}", "data.dataset=files", f"data.train_files={json.dumps([str(train_file)])}"]
    data.append(f"data.eval_files={json.dumps([str(eval_file)])}")
    args = [str(ROOT / "configs" / "minilm_sentiment.py"), *RECIPE, *data]
    reference = tmp / "one_by_eight"
    train_in_process(args[0], reference, *args[1:])
    return {"tmp": tmp, "args": args, "reference": reference, "eval_file": eval_file, "model": model}


def train_args(job: dict, run_dir: Path) -> list:
    return ["train", job["args"][0], "--run-dir", run_dir, *job["args"][1:]]


@pytest.fixture(scope="module")
def two_by_four(job) -> Path:
    run_dir = job["tmp"] / "two_by_four"
    (_, out0, err0), (_, out1, err1) = ok(Procs(train_args(job, run_dir)).wait())
    # Process 0 alone prints progress and results; the others print only warnings, prefixed.
    assert "test accuracy" in out0 and f"step {STEPS}:" in out0 and out1 == ""
    assert "freeze plan" in err0 and "freeze plan" not in err1
    assert all(line.startswith("[process 1] ") for line in err1.splitlines()), err1
    assert "[Gloo]" not in out0 + err0 + err1 and "Traceback" not in err0 + err1
    return run_dir


def test_two_by_four_equals_one_by_eight_with_dropout(job, two_by_four):
    assert_same_run(two_by_four, job["reference"])
    assert data_state(two_by_four, STEPS) == data_state(job["reference"], STEPS)  # one global position


def data_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def stopped_at(results: list[tuple[int, str, str]]) -> int:
    """The step every process says it stopped and saved at after a SIGTERM (all must agree)."""
    steps = set()
    for _, _, err in results:
        found = [line for line in err.splitlines() if "by SIGTERM; checkpoint saved" in line]
        assert len(found) == 1, err[-3000:]
        steps.add(int(found[0].split("stopped at step ")[1].split()[0]))
    assert len(steps) == 1, steps
    return steps.pop()


def test_sigterm_to_every_process_saves_one_agreed_step_and_resumes_on_one_process(job, tmp_path):
    run_dir = tmp_path / "run"
    procs = Procs(train_args(job, run_dir))
    wait_for_step(run_dir, 20, procs)
    procs.signal([0, 1], signal.SIGTERM)
    results = ok(procs.wait())
    step = stopped_at(results)
    assert 20 <= step < STEPS and max(checkpoint_steps(run_dir)) == step
    train_in_process(job["args"][0], run_dir, *job["args"][1:])  # 2 → 1 process, 4 → 8 devices a process
    assert_same_run(run_dir, job["reference"])


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_one_process_resumed_on_two_and_sigterm_to_one_of_them(job, tmp_path):
    run_dir = tmp_path / "run"
    single = Procs(train_args(job, run_dir), n=1)
    wait_for_step(run_dir, 20, single)
    single.signal([0], signal.SIGTERM)
    ((code, out, _),) = single.wait()
    assert code == 0 and "stopped by SIGTERM" in out
    first = max(checkpoint_steps(run_dir))
    procs = Procs(train_args(job, run_dir))  # 1 → 2 processes
    wait_for_step(run_dir, first + 20, procs)
    procs.signal([1], signal.SIGTERM)  # to one only: JAX's preemption sync point tells the other
    second = stopped_at(ok(procs.wait()))
    assert first + 20 <= second < STEPS
    train_in_process(job["args"][0], run_dir, *job["args"][1:])  # and 2 → 1 to the end
    assert_same_run(run_dir, job["reference"])


def test_sigkill_of_one_process_stops_the_other_within_the_peer_timeout(job, tmp_path):
    run_dir = tmp_path / "run"
    procs = Procs(train_args(job, run_dir), extra={0: ["--peer-timeout", "5"], 1: ["--peer-timeout", "5"]})
    wait_for_step(run_dir, 50, procs)  # after the checkpoint at step 40
    procs.signal([1], signal.SIGKILL)
    killed = time.monotonic()
    procs.procs[0].wait(60)
    waited = time.monotonic() - killed
    (code, _, err), _ = procs.wait()
    assert code != 0 and waited < 30, (code, waited)
    last = err.strip().splitlines()[-1]
    # JAX's heartbeat check, or gloo inside the collective the lost process left: both name it.
    assert last.startswith("jaxft: error: lost process 1: "), err[-3000:]
    assert "the last committed checkpoint is intact" in last
    assert "Check failure stack trace" not in err and "coordination_service" not in err
    assert 40 in checkpoint_steps(run_dir)
    train_in_process(job["args"][0], run_dir, *job["args"][1:])  # what the lost run left resumes
    assert_same_run(run_dir, job["reference"])


def test_eval_predict_and_export_on_two_processes_equal_one(job, two_by_four, tmp_path):
    ok(Procs(["eval", two_by_four]).wait())
    two = json.loads((two_by_four / f"eval-{STEPS}.json").read_text())
    one, _ = eval_run(two_by_four, STEPS)
    assert two.keys() == one.keys() and all(abs(two[k] - one[k]) < 1e-6 for k in one if isinstance(one[k], float))
    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["great lovely", "awful refund", "x"] * 7))
    ok(Procs(["predict", two_by_four, "--input", texts, "--output", tmp_path / "two.jsonl", "--batch-size", 8]).wait())
    predict_file(two_by_four, texts, tmp_path / "one.jsonl", 8)
    a = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["label"] for r in a] == [r["label"] for r in b] and len(a) == 21
    assert np.allclose([r["probs"] for r in a], [r["probs"] for r in b], atol=1e-6)
    ok(Procs(["export", two_by_four, tmp_path / "two_export"]).wait())
    export_run(two_by_four, tmp_path / "one_export")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "two_export" / name).read_bytes() == (tmp_path / "one_export" / name).read_bytes()


@pytest.fixture(scope="module")
def sft(tmp_path_factory, data_dir) -> dict:
    """The tiny LoRA SFT with packing, 1 × 8 in this process and 2 × 4 through the CLI."""
    tmp = tmp_path_factory.mktemp("distributed_sft")
    model = save_tiny_chat_model(tmp / "qwen2")
    args = [f"model.source={model}", *SFT_ARGS, "data.packing=true", "model.dropout_rate=0.1"]
    train_in_process(SFT, tmp / "one", *args)
    ok(Procs(["train", SFT, "--run-dir", tmp / "two", *args]).wait())
    return {"one": tmp / "one", "two": tmp / "two"}


def test_lora_sft_with_packing_two_by_four_equals_one_by_eight(sft):
    got, want = losses(sft["two"]), losses(sft["one"])
    assert sorted(got) == sorted(want) and max(abs(got[s] - want[s]) for s in want) < 1e-5
    a, b = run_params(sft["two"]), run_params(sft["one"])
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) < 1e-4


@pytest.fixture(scope="module")
def vision(tmp_path_factory, data_dir) -> dict:
    """A tiny ViT fine-tuned with RandAugment, mixup and cutmix (pairs of rows within each process's share), once
    on 1 × 8 in this process and once on 2 × 4."""
    tmp = tmp_path_factory.mktemp("distributed_vision")
    model = save_tiny_vit(tmp / "vit")
    train, val = write_image_folder(tmp / "train", per_class=8), write_image_folder(tmp / "val", per_class=3, seed=1)
    augment = {"randaugment_ops": 1, "mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    config = write_vit_config(tmp / "config.py", model, train, val, train={"max_steps": 8}, data=augment)
    train_in_process(config, tmp / "one")
    ok(Procs(["train", config, "--run-dir", tmp / "two"]).wait())
    return {"tmp": tmp, "one": tmp / "one", "two": tmp / "two", "val": val}


def test_image_classification_two_by_four_equals_one_by_eight(vision):
    one, two = metrics_records(vision["one"]), metrics_records(vision["two"])
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    for a, b in zip(one, two):
        for k in ("loss", "eval_loss", "eval_accuracy", "eval_top5_accuracy"):
            assert (k in a) == (k in b) and abs(a.get(k, 0.0) - b.get(k, 0.0)) < 1e-5, (a["step"], k)
    a, b = run_params(vision["one"]), run_params(vision["two"])
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) < 1e-4
    assert data_state(vision["two"], 8) == data_state(vision["one"], 8)  # one global position
    assert data_state(vision["one"], 8)["iterator"] == {"global_batches": 8}
    # predict of the 2 × 4 run on two processes labels every image as one process does.
    out_one, out_two = vision["tmp"] / "one.jsonl", vision["tmp"] / "two.jsonl"
    predict_file(vision["two"], vision["val"], out_one, batch_size=4)
    ok(Procs(["predict", vision["two"], "--input", vision["val"], "--output", out_two, "--batch-size", "4"]).wait())
    rows_one = [json.loads(line) for line in out_one.read_text().splitlines()]
    rows_two = [json.loads(line) for line in out_two.read_text().splitlines()]
    assert [r["image"] for r in rows_two] == [r["image"] for r in rows_one] and len(rows_one) == 9
    assert max(abs(x - y) for r, q in zip(rows_one, rows_two) for x, y in zip(r["probs"], q["probs"])) < 1e-5


def test_generate_on_two_processes_equals_one(sft):
    prompts = ["hello there", "what is up"]
    argv = ["generate", sft["two"], "--max-new-tokens", 6]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    (_, out, _), (_, out1, _) = ok(Procs(argv).wait())
    one = generate_run(sft["two"], prompts, max_new_tokens=6)
    blocks = out.split("--- [")[1:]
    assert [b.split("\n", 1)[1].rstrip("\n") for b in blocks] == one and out1 == ""


# ------------------------------------------------------------------------------------------ bad launches


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"coordinator": None, "num_processes": None, "process_id": None, **flags})


def test_resolve_launch_from_flags_then_environment_then_cluster_detection():
    flags = _args(coordinator="127.0.0.1:1234", num_processes="2", process_id="1", peer_timeout=7)
    assert distributed.resolve_launch(flags, {}) == Launch("127.0.0.1:1234", 2, 1, None, 300, 7)
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve_launch(_args(), {**env, "JAX_LOCAL_DEVICE_IDS": "0,1"}).local_device_ids == (0, 1)
    assert distributed.resolve_launch(_args(), {}) is None
    assert distributed.resolve_launch(_args(num_processes="1", process_id="0", coordinator="h:1"), {}) is None
    assert distributed.resolve_launch(_args(), {"TPU_WORKER_HOSTNAMES": "a,b"}) == Launch(None, None, None)
    assert distributed.resolve_launch(_args(), {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}).coordinator is None
    assert distributed.resolve_launch(_args(), {"TPU_WORKER_HOSTNAMES": "localhost"}) is None


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (dict(coordinator="127.0.0.1:1"), {}, "--num-processes, --process-id missing"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
        (
            dict(coordinator="h:1", num_processes="2", process_id="2"),
            {},
            "process id 2 is not below the process count 2",
        ),
        (dict(coordinator="h:1", num_processes="two", process_id="0"), {}, "the process count 'two' is not an integer"),
        (dict(coordinator="h", num_processes="2", process_id="0"), {}, "coordinator 'h': expected HOST:PORT"),
        (dict(coordinator="h:1", num_processes="2", process_id="0", peer_timeout=0), {}, "--peer-timeout: 0"),
    ],
)
def test_bad_launch_flags(flags, env, message):
    with pytest.raises(DistributedError, match=message):
        distributed.resolve_launch(_args(**flags), env)


def test_bad_launches_are_one_line_on_every_process_and_write_nothing(job, tmp_path):
    run_dir = tmp_path / "run"
    partial = Procs(train_args(job, run_dir) + ["--process-id", "1"], n=1).wait()
    address = free_address()  # nobody listens there
    lonely = Procs(
        train_args(job, run_dir)
        + ["--coordinator", address, "--num-processes", "2", "--process-id", "1", "--init-timeout", "3"],
        n=1,
    ).wait(120)
    mismatch = Procs(train_args(job, run_dir), extra={1: ["train.seed=7"]}).wait()
    for results, line in [
        (
            partial,
            "several processes need a coordinator, a process count and an id: --coordinator, --num-processes missing",
        ),
        (lonely, f"could not join the coordinator at {address} within 3 s"),
        (mismatch, "process 1 was started with another command or config than process 0"),
    ]:
        for code, _, err in results:
            last = err.strip().splitlines()[-1]
            assert code != 0 and line in last and "Traceback" not in err, err[-3000:]
            assert not any(x in err for x in ("Check failure", "client.h", "@     0x")), err[-3000:]
    assert not run_dir.exists()


def _filtered(stdout: str, stderr: str, index: int | None = 1, num_processes: int = 2) -> tuple[str, str]:
    """What the output filter makes of a process's stdout and stderr."""
    pipes = [os.pipe() for _ in range(4)]  # its two inputs, and the two streams it writes to
    for (_, w), text in zip(pipes[:2], (stdout, stderr)):
        os.write(w, text.encode())
        os.close(w)
    launch = Launch("127.0.0.1:1", num_processes, index, peer_timeout=9)
    distributed.filter_streams(pipes[0][0], pipes[1][0], pipes[2][1], pipes[3][1], launch, "train")
    out = []
    for r, w in pipes[2:]:
        os.close(w)
        out.append(os.read(r, 1 << 16).decode())
    return out[0], out[1]


# What JAX prints when a peer stops sending heartbeats (shortened from a real run).
HEARTBEAT = (
    "E1204 00:43:35.324875    2455 coordination_service.cc:1549] [57] Use error polling to propagate: "
    "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
    "F1204 00:43:35.325625    2466 client.h:80] Terminating process because the JAX distributed service detected "
    "fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    "*** Check failure stack trace: ***\n    @     0x7ff449a40634  absl::log_internal::LogMessage::SendToLog()\n"
)


def test_the_output_filter_keeps_process_0_and_prefixes_the_others():
    stdout = (
        "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\nstep 1: loss=1\n"
    )
    stderr = "W1204 00:46:38.43 3052 preemption_notifier.cc:90] SIGTERM caught\nsome warning\n"
    assert _filtered(stdout, stderr, index=0) == ("step 1: loss=1\n", "some warning\n")
    assert _filtered(stdout, stderr, index=1) == ("", "[process 1] some warning\n")
    # Two devices' threads writing their lines at once, as a make test run once showed.
    interleaved = (
        "[Gloo] Rank [Gloo] Rank 1 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n"
        "0 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\nstep 1: loss=1\n"
    )
    assert _filtered(interleaved, "", index=0) == ("step 1: loss=1\n", "")
    split = (
        "[Gloo] Rank 0 is conn[Gloo] Rank 1 is connected to 7 peer ranks. Expected number of connected peer ranks "
        "is : 7\nected to 7 peer ranks. Expected number of connected peer ranks is : 7\nstep 1: loss=1\n"
    )
    assert _filtered(split, "", index=0) == ("step 1: loss=1\n", "")


def test_the_output_filter_turns_fatal_distributed_errors_into_one_line():
    _, err = _filtered("", "a warning\n" + HEARTBEAT, index=0)
    assert err.splitlines() == [
        "a warning",
        "jaxft: error: lost process 1: no heartbeat for 9 s (--peer-timeout); the last committed checkpoint is "
        "intact: start every process again to resume",
    ]
    gloo = "terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
    gloo += "  what():  [enforce fail at pair.cc:459] Received data size doesn't match expected size.\n"
    _, err = _filtered("", gloo, index=1)
    assert err.startswith("[process 1] jaxft: error: lost process 0: a collective with it failed (Received data size")
    assert len(err.splitlines()) == 1
    register = "F1204 00:45:59.401753    2985 client.h:80] Terminating process. absl::Status: DEADLINE_EXCEEDED: "
    register += "Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/RegisterTask\n*** Check failure\n"
    _, err = _filtered("", register, index=1)
    assert err.startswith("[process 1] jaxft: error: could not join the coordinator at 127.0.0.1:1 within 300 s")
    assert len(err.splitlines()) == 1
    held = ["E1204 00:43:35.3 2455 coordination_service.cc:1549] an error no fatal one follows", "next line"]
    _, err = _filtered("", "\n".join(held) + "\n", index=0)
    assert err.splitlines() == held
