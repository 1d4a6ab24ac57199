"""Inference from a run dir: restore the latest (or a given) checkpoint's parameters and label JSONL text."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxft import compile
from jaxft import mesh as mesh_lib
from jaxft.config import from_dict, length_buckets
from jaxft.data.buckets import bucket_for
from jaxft.data.builders import DataError, read_records
from jaxft.run_dir import read_run, restore_run


def predict_file(
    run_dir: Path, input_path: Path, output_path: Path, batch_size: int = 32, step: int | None = None
) -> int:
    """Writes each input line with `label` and `probs` added (token tasks: `labels` and `probs` per
    whitespace word; image classifiers: lines of {"image": path}, or every image under a folder); the output file
    appears only when complete."""
    meta = read_run(run_dir)  # fail on a wrong run dir before reading anything else
    task = meta["config"].get("model", {}).get("task")
    if task == "causal-lm":
        raise DataError(f"{run_dir}: predict labels text with a classifier; this run is a causal LM")
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"{output_path}: output would overwrite the input")
    if task == "image-classification":
        return predict_images(run_dir, input_path, output_path, batch_size, step)
    if input_path.is_dir():
        raise DataError(f"{input_path}: a folder of images is input for an image classifier; this run labels text")
    records = [r for _, r in read_records(input_path)]
    for i, r in enumerate(records, start=1):
        if not isinstance(r.get("text"), str):
            raise DataError(f'{input_path}:{i}: each line needs a string "text" field')
    if not records:
        raise DataError(f"{input_path}: no input lines")
    run = restore_run(run_dir, step)
    params, meta, mesh = run.params, run.meta, run.mesh
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(meta["source"]["path"])
    max_length = meta["config"]["data"]["max_length"]
    dp = mesh_lib.data_parallel_size(mesh)
    rows = mesh_lib.batch_rows(mesh, -(-batch_size // dp) * dp)  # this process tokenizes its rows of each batch
    fn = compile.jit_predict_step(run.graphdef, jax.tree.map(lambda x: x.sharding, params), mesh)
    labels = meta["label_names"]
    token_level = meta["spec"]["task"] == "token-classification"
    outputs = []
    buckets = length_buckets(from_dict(meta["config"]).data)
    for start in range(0, len(records), rows.size):
        texts = [records[i]["text"] if i < len(records) else "" for i in start + rows.mine]
        inputs = [t.split() or [""] for t in texts] if token_level else texts
        # The whole global batch's longest row picks the bucket, so every process pads to the same length.
        every = [r["text"] for r in records[start : start + rows.size]]
        every = [t.split() or [""] for t in every] if token_level else every
        measured = tokenizer(every, truncation=True, max_length=max_length, is_split_into_words=token_level)
        longest = max(len(ids) for ids in measured["input_ids"])
        enc = tokenizer(
            inputs,
            padding="max_length",
            truncation=True,
            max_length=bucket_for(longest, buckets) if buckets else max_length,
            return_tensors="np",
            return_token_type_ids=True,
            is_split_into_words=token_level,
        )
        batch = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
        probs = np.asarray(jax.device_get(fn(params, mesh_lib.make_global_batch(batch, mesh, rows))))
        # Every process holds the whole batch's probabilities.
        for i in range(min(rows.size, len(records) - start)):  # a token task's words: from the measuring pass
            outputs.append(
                _word_outputs(measured.word_ids(i), probs[i], labels) if token_level else _output(probs[i], labels)
            )
    if jax.process_index() == 0:
        _write_atomically(output_path, records, outputs)
    return len(records)


def image_inputs(input_path: Path) -> tuple[list[dict], list[Path]]:
    """The records and image paths of `--input`: every image under a folder (sorted, as {"image": path}), or the
    lines of a JSONL/CSV file with an "image" path (relative to the file's folder)."""
    from jaxft.data.image_builders import is_image

    if input_path.is_dir():
        paths = sorted(p for p in input_path.rglob("*") if is_image(p))
        if not paths:
            raise DataError(f"{input_path}: no images under this folder")
        return [{"image": str(p)} for p in paths], paths
    records, paths = [], []
    for i, r in read_records(input_path):
        if not isinstance(r.get("image"), str):
            raise DataError(f'{input_path}:{i}: each line needs a string "image" field (the image\'s path)')
        path = Path(r["image"]).expanduser()
        path = path if path.is_absolute() else input_path.parent / path
        if not path.is_file():
            raise DataError(f"{input_path}:{i}: image {path} does not exist")
        records.append(r)
        paths.append(path)
    if not records:
        raise DataError(f"{input_path}: no input lines")
    return records, paths


def predict_images(run_dir: Path, input_path: Path, output_path: Path, batch_size: int, step: int | None) -> int:
    """Labels images with an image classifier, through the eval transform the run recorded."""
    from jaxft.data import image_pipeline, images

    records, paths = image_inputs(input_path)
    run = restore_run(run_dir, step)
    params, meta, mesh = run.params, run.meta, run.mesh
    transform = images.EvalTransform.from_record(meta["images"])
    dp = mesh_lib.data_parallel_size(mesh)
    rows = mesh_lib.batch_rows(mesh, -(-batch_size // dp) * dp)  # this process decodes its rows of each batch
    fn = compile.jit_predict_step(
        run.graphdef, jax.tree.map(lambda x: x.sharding, params), mesh, task="image-classification"
    )

    def read(i: int) -> tuple[object, int]:
        try:
            return images.decode_rgb(paths[i].read_bytes()), 0
        except images.ImageDecodeError as e:
            raise DataError(f"{paths[i]}: unreadable image ({e})") from None

    threads = image_pipeline.workers(from_dict(meta["config"]).data)
    outputs = []
    for start, batch in zip(
        range(0, len(records), rows.size),
        image_pipeline.iter_image_batches(len(records), read, transform, rows, threads),
    ):
        pixels = mesh_lib.make_global_batch({"pixel_values": batch["pixel_values"]}, mesh, rows)
        probs = np.asarray(jax.device_get(fn(params, pixels)))  # every process holds the whole batch's
        outputs += [_output(probs[i], meta["label_names"]) for i in range(min(rows.size, len(records) - start))]
    if jax.process_index() == 0:
        _write_atomically(output_path, records, outputs)
    return len(records)


def _write_atomically(output_path: Path, records: list[dict], outputs: list[dict]) -> None:
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r, out in zip(records, outputs):
            f.write(json.dumps({**r, **out}) + "\n")
    os.replace(tmp, output_path)


def _output(probs: np.ndarray, labels: list[str]) -> dict:
    return {"label": labels[int(np.argmax(probs))], "probs": [float(x) for x in probs]}


def _word_outputs(word_ids: list[int | None], probs_LxC: np.ndarray, labels: list[str]) -> dict:
    """Token tasks: one label per whitespace word, read at its first sub-token (truncated words get none)."""
    words: dict[int, np.ndarray] = {}
    for j, w in enumerate(word_ids):
        if w is not None and w not in words:
            words[w] = probs_LxC[j]
    ordered = [words[w] for w in sorted(words)]
    return {"labels": [labels[int(np.argmax(p))] for p in ordered], "probs": [[float(x) for x in p] for p in ordered]}
