"""Metric writers (train.report_to): RUN_DIR/metrics.jsonl, TensorBoard event files and Weights & Biases, from
process 0 only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax


class MetricsError(RuntimeError):
    """A metrics sink that cannot start (the wandb extra not installed, W&B refusing the run)."""


def check_sinks(sinks: tuple[str, ...]) -> None:
    """Before anything is written: every sink can be used here."""
    if "wandb" in sinks:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise MetricsError("train.report_to: 'wandb' needs the wandb extra: pip install 'jaxft[wandb]'") from None


class MetricsWriter:
    def __init__(
        self,
        run_dir: Path,
        sinks: tuple[str, ...] = ("jsonl", "tensorboard"),
        wandb_project: str = "jaxft",
        wandb_run_name: str = "",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._tb = self._wandb = None
        if not self.enabled:
            return
        if "jsonl" in sinks:
            self._file = open(self.path, "a", encoding="utf-8")
        if "tensorboard" in sinks:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if "wandb" in sinks:
            self._wandb = start_wandb(Path(run_dir), wandb_project, wandb_run_name, config or {})

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/Infinity: a non-finite value is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self._file is not None:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and _is_scalar(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _new_run_id() -> str:
    """A W&B run id: 8 lowercase letters and digits, as W&B makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_wandb(run_dir: Path, project: str, name: str, config: dict[str, Any]) -> Any:
    """A W&B run for this run dir: the same W&B run again on a resume (its id is kept in RUN_DIR/wandb.json).
    WANDB_MODE, WANDB_API_KEY etc. are W&B's own; its files go under RUN_DIR/wandb."""
    import wandb

    id_file = run_dir / "wandb.json"
    run_id = json.loads(id_file.read_text())["id"] if id_file.is_file() else _new_run_id()
    try:
        run = wandb.init(
            project=project,
            name=name or run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )
    except Exception as e:  # W&B raises its own errors (no login, no network, a refused id): one line
        raise MetricsError(f"train.report_to: W&B could not start the run: {str(e).splitlines()[0][:200]}") from None
    if not id_file.is_file():
        id_file.write_text(json.dumps({"id": run_id, "project": project}) + "\n")
    return run


def truncate_metrics(run_dir: Path, last_step: int, name: str = "metrics.jsonl") -> None:
    """Drops records of RUN_DIR/`name` after `last_step` (a resume replays those steps), atomically; process 0."""
    path = Path(run_dir) / name
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
