"""`jaxft plot`: PNG pictures of a run from its metrics.jsonl and run.json (no model is loaded): training loss and
learning rate, the eval metrics, and a classifier's confusion matrix, under RUN_DIR/plots/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxft.checkpoint import RunCheckpointError, best_mode
from jaxft.config import from_dict
from jaxft.run_dir import read_run

EVAL_CURVES = ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_perplexity")


class PlotError(RunCheckpointError):
    """A run dir with nothing to plot."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no metrics to plot (was 'jsonl' left out of train.report_to?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    if not records:
        raise PlotError(f"{path}: no metrics to plot yet")
    return records


def plot_run(run_dir: Path, best: bool = False) -> list[Path]:
    """Writes the run's pictures; returns their paths. `best`: the confusion matrix of the best eval (by the
    run's checkpoint.keep_best_metric) instead of the last."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    meta = read_run(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [_training(records, out / "training.png")]
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        written.append(_evals(evals, out / "eval.png"))
        chosen = _best_eval(evals, meta) if best else evals[-1]
        if chosen.get("eval_confusion"):
            written.append(_confusion(chosen, meta["label_names"], out / "confusion.png"))
    return written


def _best_eval(evals: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(meta["config"]).checkpoint
    metric = cfg.keep_best_metric or "eval_loss"
    scored = [r for r in evals if isinstance(r.get(metric), (int, float))]
    if not scored:
        raise PlotError(f"--best: no eval recorded {metric!r}")
    pick = min if best_mode(cfg) == "min" else max
    return pick(scored, key=lambda r: r[metric])


def _training(records: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    steps = [r for r in records if isinstance(r.get("loss"), (int, float))]
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    lr_ax.plot([r["step"] for r in steps], [r.get("learning_rate", float("nan")) for r in steps], color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    fig.suptitle("training")
    return _save(fig, path)


def _evals(evals: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    curves = [k for k in EVAL_CURVES if any(isinstance(r.get(k), (int, float)) for r in evals)]
    fig, axes = plt.subplots(len(curves), 1, sharex=True, figsize=(8, 2.5 * len(curves)), squeeze=False)
    for ax, key in zip(axes[:, 0], curves):
        points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="o")
        ax.set_ylabel(key.removeprefix("eval_"))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("eval")
    return _save(fig, path)


def _confusion(record: dict[str, Any], labels: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(record["eval_confusion"], np.int64)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(counts):
        color = "white" if n > counts.max() / 2 else "black"
        ax.text(j, i, str(n), ha="center", va="center", color=color)
    ax.set_title(f"confusion at step {record['step']} (accuracy {record.get('eval_accuracy', float('nan')):.3f})")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)  # a failed write never leaves half a picture under the real name
    return path
