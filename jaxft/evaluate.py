"""Evaluation over a held-out split: sums per-batch stats from the jitted eval step into loss, accuracy
and macro-F1; and `jaxft eval` of a saved checkpoint. It owns no model math (step.py does)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxft import compile
from jaxft import mesh as mesh_lib
from jaxft.config import ConfigError, apply_overrides, from_dict, length_buckets, validate
from jaxft.data import pipeline
from jaxft.run_dir import restore_run


def summarize(totals: dict[str, np.ndarray]) -> dict[str, float]:
    """Loss and accuracy over all weighted examples (tokens for token and LM tasks). Classification adds
    macro-F1, the mean per-class F1 over every class in the labels or the predictions, top-5 accuracy (image
    classification with 5 classes or more), and the confusion counts
    (`eval_confusion[true][predicted]`, up to step.MAX_CONFUSION_CLASSES classes); a causal LM adds perplexity,
    exp of the per-token loss."""
    count = max(float(totals["count"]), 1.0)
    out = {
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_accuracy": float(totals["correct"]) / count,
        "eval_examples": float(totals["count"]),
    }
    if "tp" not in totals:
        return {**out, "eval_perplexity": float(np.exp(min(out["eval_loss"], 700.0)))}
    tp, predicted, true = (np.asarray(totals[k], np.float64) for k in ("tp", "predicted", "true"))
    present = (predicted + true) > 0
    f1 = np.where(present, 2 * tp / np.maximum(predicted + true, 1e-12), 0.0)
    out["eval_macro_f1"] = float(f1[present].mean()) if present.any() else 0.0
    if "top5_correct" in totals:  # image classification with 5 classes or more
        out["eval_top5_accuracy"] = float(totals["top5_correct"]) / count
    if "confusion" in totals:  # [true][predicted] example (token) counts
        out["eval_confusion"] = np.asarray(totals["confusion"]).round().astype(int).tolist()
    return out


def build_evaluate(
    eval_step: Callable,
    host_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None,
    mesh: Any,
    rows: mesh_lib.BatchRows,
) -> Callable[[Any, Any], dict[str, float]]:
    """evaluate(trainable, frozen) over every batch `host_batches()` yields (this process's `rows` of each);
    {} when there is no eval split."""

    def evaluate(trainable: Any, frozen: Any) -> dict[str, float]:
        if host_batches is None:
            return {}
        batches = host_batches()
        pending = [eval_step(trainable, frozen, mesh_lib.make_global_batch(b, mesh, rows)) for b in batches]
        totals: dict[str, Any] = {}
        for stats in jax.device_get(pending):  # one transfer after all batches are queued
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        return summarize(totals)

    return evaluate


def classification_batches(
    source: Any, encoder: pipeline.Encoder, rows: mesh_lib.BatchRows, buckets: tuple[int, ...] = ()
):
    """host_batches for build_evaluate over a classification eval split, or None without one."""
    if source is None:
        return None
    lengths = encoder.lengths(source) if buckets else None
    return lambda: pipeline.iter_eval_batches(source, encoder, rows, buckets, lengths)


def labelled_batches(cfg: Any, meta: dict[str, Any], folder: Path, rows: mesh_lib.BatchRows):
    """A classification run's eval batches, with the run's label set (images: through the run's eval transform)."""
    images = cfg.model.task == "image-classification"
    if images:
        from jaxft.data import image_pipeline
        from jaxft.data.images import EvalTransform

        sources: Any = image_pipeline.open_image_sources(cfg.data)
    else:
        sources = pipeline.open_sources(cfg.data, task=cfg.model.task)
    if sources.eval is None:
        raise pipeline.DataError(f"data.eval_split: {cfg.data.eval_split!r} is not a split of {cfg.data.dataset}")
    if list(sources.label_names) != list(meta["label_names"]):
        raise pipeline.DataError(
            f"data: labels {list(sources.label_names)} differ from the run's {meta['label_names']}"
        )
    if images:
        transform, threads = EvalTransform.from_record(meta["images"]), image_pipeline.workers(cfg.data)
        return lambda: image_pipeline.iter_eval_batches(sources, transform, rows, threads)
    encoder = pipeline.Encoder(folder, cfg.data.max_length, sources)
    return classification_batches(sources.eval, encoder, rows, length_buckets(cfg.data))


def lm_batches(cfg: Any, meta: dict[str, Any], folder: Path, rows: mesh_lib.BatchRows):
    """A causal-LM run's eval batches (one example per row), tokenized as in training."""
    from jaxft.data import lm

    sources = lm.open_lm_sources(cfg.data)
    if sources.eval is None:
        raise pipeline.DataError("data.eval_files: this causal-lm run has no eval files; name some")
    encoder = lm.LMEncoder(folder, cfg.data, int(meta["spec"]["vocab_size"]))
    buckets = length_buckets(cfg.data)
    return lambda: lm.iter_lm_eval_batches(sources.eval, encoder, rows, cfg.data.max_length, buckets)


def eval_run(run_dir: Path, step: int, overrides: list[str] = ()) -> tuple[dict[str, Any], Path]:
    """Evaluates one checkpoint of a run on its eval split (or the one `data.*` overrides name) and
    writes RUN_DIR/eval-<step>.json."""
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"{bad[0]!r}: jaxft eval takes only data.* overrides")
    run = restore_run(run_dir, step)
    graphdef, params, meta, mesh, step = run.graphdef, run.params, run.meta, run.mesh, run.step
    cfg = validate(apply_overrides(from_dict(meta["config"]), list(overrides)))
    if cfg.model.task == "causal-lm":  # the run's LM-head chunking: a big vocabulary's logits fit as in training
        graphdef = nnx.split(nnx.merge(graphdef, params).configure(logits_chunk=cfg.model.logits_chunk))[0]
    dp = mesh_lib.data_parallel_size(mesh)
    rows = mesh_lib.batch_rows(mesh, -(-cfg.train.eval_batch_size // dp) * dp)
    folder = Path(meta["source"]["path"])
    batches = (lm_batches if cfg.model.task == "causal-lm" else labelled_batches)(cfg, meta, folder, rows)
    evaluate = build_evaluate(compile.jit_eval_step(graphdef, mesh, cfg.model.task), batches, mesh, rows)
    metrics = evaluate(params, type(params)({}))  # all parameters as one partition: eval has no split
    record = {"step": step, "dataset": cfg.data.dataset, "split": cfg.data.eval_split, **metrics}
    out = Path(run_dir) / f"eval-{step}.json"
    if jax.process_index() == 0:
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{out.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, out)
    return record, out
