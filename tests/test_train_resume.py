"""Resume and preemption: a run killed at a random step and resumed ends bitwise equal to an uninterrupted
one (across epoch boundaries); SIGTERM saves and exits 0; a kill during an async save keeps the previous
checkpoint; restore onto another mesh; config changes on resume; the non-finite policies."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxft.checkpoint import complete_steps
from tests.fixtures import DEMO, ROOT, metrics_records, run_params, write_resume_config


def cli_args(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxft.cli", "train", str(config), "--run-dir", str(run_dir), *overrides]


# Subprocess runs share a persistent XLA compilation cache: a resumed run reuses the step compiled by
# the run before it (the same program, so the same results), which keeps these tests quick.
CHILD_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    CHILD_ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    CHILD_ENV.clear()


def child_env(extra=None) -> dict[str, str]:
    return {**os.environ, **CHILD_ENV, **(extra or {})}


def run(args, env=None, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=child_env(env), timeout=timeout)


def wait_for(predicate, proc, timeout=300.0, poll=0.02):
    """Polls until predicate() or the process ends; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_records(run_dir)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert, data_dir):
    tmp = tmp_path_factory.mktemp("resume")
    config = write_resume_config(tmp, tiny_bert)
    reference = tmp / "reference"
    r = run(cli_args(config, reference))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"tmp": tmp, "config": config, "reference": reference}


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(setup):
    seed = int(time.time())
    kill_after = random.Random(seed).randint(2, 9)  # the 12-step run crosses epochs at steps 5 and 10
    run_dir = setup["tmp"] / f"killed-{seed}"
    proc = subprocess.Popen(
        cli_args(setup["config"], run_dir), cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Killed before its first save commits, a run has nothing to resume from and rightly starts over:
        # wait for a committed checkpoint too, so the second run must resume.
        seen = wait_for(
            lambda: complete_steps(run_dir) and any(r["step"] >= kill_after for r in metrics_records(run_dir)), proc
        )
        assert seen and proc.poll() is None, f"run ended before step {kill_after} (seed {seed})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    resumed = run(cli_args(setup["config"], run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr, f"seed {seed}: the second run did not resume"
    assert_bitwise_equal(run_params(setup["reference"]), run_params(run_dir))
    assert losses(run_dir) == losses(setup["reference"]), f"seed {seed}, killed after step {kill_after}"
    assert sorted(losses(run_dir)) == list(range(1, 13))


def test_sigterm_saves_the_step_it_stopped_at_and_exits_0(setup):
    run_dir = setup["tmp"] / "sigterm"
    args = cli_args(setup["config"], run_dir, "checkpoint.every_steps=100")  # no save but the stop's own
    proc = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any(r["step"] >= 3 for r in metrics_records(run_dir)), proc)
        assert proc.poll() is None, "run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= stopped < 12
    from jaxft.checkpoint import complete_steps

    assert complete_steps(run_dir) == [stopped]
    assert max(r["step"] for r in metrics_records(run_dir)) == stopped
    # The stop is a clean preemption: resuming finishes the run exactly as the reference.
    resumed = run(cli_args(setup["config"], run_dir, "checkpoint.every_steps=100"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(run_params(setup["reference"]), run_params(run_dir))


def test_config_changes_on_resume(setup, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(setup["reference"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")
    shutil.rmtree(run_dir / "checkpoints" / "10")
    r = run(cli_args(setup["config"], run_dir, "train.batch_size=16", "optim.name=sgd"))
    assert r.returncode == 2
    assert "optim.name ('adamw' -> 'sgd')" in r.stderr and "train.batch_size (8 -> 16)" in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in r.stderr
    # Logging-only changes are accepted and the result is unchanged.
    r = run(cli_args(setup["config"], run_dir, "train.log_every_steps=3", "checkpoint.every_steps=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bitwise_equal(run_params(setup["reference"]), run_params(run_dir))


def test_allow_config_change_resumes_on_purpose(setup, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(setup["reference"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")
    r = run(cli_args(setup["config"], run_dir, "optim.learning_rate=0.01", "--allow-config-change"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming with a changed config" in r.stderr and "resuming from" in r.stderr


def resumable_copy(reference: Path, dest: Path, last_step: int) -> Path:
    """A copy of a finished run whose checkpoints after `last_step` are gone, as if it had died there."""
    import shutil

    shutil.copytree(reference, dest)
    for step in complete_steps(dest):
        if step > last_step:
            shutil.rmtree(dest / "checkpoints" / str(step))
    return dest


def test_restore_onto_another_mesh_and_device_count(setup, tmp_path):
    from jaxft.config import load_config
    from jaxft.train import train

    expected = run_params(setup["reference"])
    resharded = resumable_copy(setup["reference"], tmp_path / "resharded", 4)
    cfg = load_config(setup["config"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    result = train(cfg, resharded)
    assert result.start_step == 4
    kernel = result.state.trainable["encoder"]["layers"][0]["up"]["kernel"].get_value()
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    got = run_params(resharded)
    for k in expected:  # other reduction orders: equal up to float rounding, not bitwise
        np.testing.assert_allclose(got[k], expected[k], atol=2e-5, err_msg=k)

    # Saved on 8 devices, resumed by a process that has 4.
    four = resumable_copy(setup["reference"], tmp_path / "four", 4)
    r = run(
        cli_args(setup["config"], four, "mesh.data=2", "mesh.fsdp=2"),
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    got = run_params(four)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=2e-5, err_msg=k)


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path, data_dir):
    """MiniLM's state (params + Adam moments, ~270 MB) takes long enough to write that the kill lands
    while step 4's temporary directory exists; step 2 must survive and the resume must clean up."""
    from jaxft.checkpoint import checkpoint_dir, complete_steps

    run_dir = tmp_path / "run"
    tiny = ["train.max_steps=6", "train.batch_size=8", "data.max_length=16", "train.eval_every_steps=0"]
    args = [sys.executable, "-m", "jaxft.cli", "train", DEMO, "--run-dir", str(run_dir), *tiny]
    args += ["checkpoint.every_steps=2", "train.log_every_steps=1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def saving_step_4() -> bool:
        d = checkpoint_dir(run_dir)
        return d.is_dir() and any(p.name.startswith("4.orbax-checkpoint-tmp") for p in d.iterdir())

    try:
        caught = wait_for(saving_step_4, proc, poll=0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert caught and proc.returncode == -signal.SIGKILL, "the kill did not land during step 4's save"
    assert complete_steps(run_dir) == [2]
    run_params(run_dir)  # the previous checkpoint restores
    r = run([*args[:-2], "checkpoint.every_steps=2", "train.log_every_steps=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "/checkpoints/2" in r.stderr
    assert not [p for p in checkpoint_dir(run_dir).iterdir() if "tmp" in p.name]
    assert complete_steps(run_dir) == [6, 4, 2]


def _limit_file_size(limit_bytes: int):
    """A child whose writes past `limit_bytes` fail with EFBIG, like a full disk (SIGXFSZ ignored)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_a_failing_save_stops_with_one_line_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    import shutil

    from jaxft.checkpoint import complete_steps

    run_dir = tmp_path / "run"
    shutil.copytree(setup["reference"], run_dir)
    for step in (6, 8, 10, 12):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    # The tiny model's embedding table alone is ~4 MB: its array file cannot be written under 1 MB.
    r = subprocess.run(
        cli_args(setup["config"], run_dir),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=600,
        preexec_fn=_limit_file_size(1 << 20),
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("jaxft: error: ") and "saving step 6 failed" in line, r.stderr[-3000:]
    assert "the last good checkpoint is step 4" in line and "Traceback" not in r.stderr
    assert complete_steps(run_dir) == [4, 2]
    assert_bitwise_equal(run_params(setup["reference"], 4), run_params(run_dir, 4))


def test_a_run_trained_on_8_devices_is_read_on_1(setup, tmp_path):
    """Read-only commands restore into this process's mesh, not the saved one."""
    one = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = run([sys.executable, "-m", "jaxft.cli", "eval", str(setup["reference"]), "--step", "12"], env=one)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads((setup["reference"] / "eval-12.json").read_text())
    final = [x for x in metrics_records(setup["reference"]) if "eval_loss" in x][-1]
    assert abs(ours["eval_loss"] - final["eval_loss"]) < 1e-5


def test_unreadable_checkpoint_metrics_are_moved_aside_not_fatal(setup, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(setup["reference"], run_dir)
    metrics_file = run_dir / "checkpoints" / "12" / "metrics" / "metrics"
    assert metrics_file.is_file()  # the final eval's metrics, written for keep_best_metric
    metrics_file.write_bytes(b"\x00garbage")
    r = run(cli_args(setup["config"], run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unreadable checkpoint metrics" in r.stderr and (run_dir / "damaged_checkpoints" / "12").is_dir()
    assert_bitwise_equal(run_params(setup["reference"]), run_params(run_dir))
