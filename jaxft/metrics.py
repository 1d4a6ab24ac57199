"""Metric writers: RUN_DIR/metrics.jsonl and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, run_dir: Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._file = open(self.path, "a", encoding="utf-8")
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/Infinity: a non-finite value is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


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
