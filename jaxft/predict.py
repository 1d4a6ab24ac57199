"""Inference from a run dir: restore the latest (or a given) checkpoint's parameters and label JSONL text."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxft import compile, mesh, models, pretrained
from jaxft.checkpoint import RunCheckpointError, restore_params
from jaxft.config import from_dict
from jaxft.data.builders import DataError, read_records
from jaxft.paths import path_str
from jaxft.sharding import tree_shardings


def read_run(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise RunCheckpointError(f"{run_dir}: not a jaxft run dir (no run.json)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunCheckpointError(f"{path}: corrupted run metadata ({e})") from None
    kinds = {"config": dict, "spec": dict, "source": dict, "label_names": list}
    bad = [k for k, kind in kinds.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if bad:
        raise RunCheckpointError(f"{path}: corrupted run metadata ({', '.join(bad)} missing or malformed)")
    return meta


def load_run_model(run_dir: Path, step: int | None = None):
    """(graphdef, params, meta, mesh, step) of a finished or running run, restored into shardings."""
    meta = read_run(run_dir)
    cfg = from_dict(meta["config"])
    try:
        m = mesh.build_mesh(cfg.mesh)
    except mesh.MeshError:  # trained on another device count: data-parallel over what this host has
        m = mesh.build_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
    spec = models.spec_from_dict(meta.get("family", "bert"), meta["spec"])
    adapters = pretrained.lora_spec(cfg.lora)
    graphdef, abstract = models.build_abstract_model(spec, cfg.model.param_dtype, adapters)
    if cfg.model.frozen_dtype:  # restored in the dtypes they were trained and saved in
        frozen = {path_str(p) for p, _ in abstract.flat_state()} - set(meta.get("trainable_paths", ()))
        abstract = pretrained.cast_abstract(abstract, cfg.model.frozen_dtype, frozen)
    shardings = pretrained.infer_shardings(abstract, m, cfg.mesh.rules)
    pre = pretrained.Pretrained(
        Path(meta["source"]["path"]), meta["hf_config"], spec, graphdef, abstract, shardings, {}, adapters
    )
    load_frozen = lambda frozen_abstract, step_meta: pretrained.load_frozen(
        pre, cfg.model, cfg.load, frozen_abstract, step_meta["source"]
    )
    params, _, step = restore_params(run_dir, abstract, tree_shardings(abstract, shardings), step, spec, load_frozen)
    return graphdef, params, meta, m, step


def predict_file(
    run_dir: Path, input_path: Path, output_path: Path, batch_size: int = 32, step: int | None = None
) -> int:
    """Writes each input line with `label` and `probs` added (token tasks: `labels` and `probs` per
    whitespace word); the output file appears only when complete."""
    meta = read_run(run_dir)  # fail on a wrong run dir before reading anything else
    if meta["config"].get("model", {}).get("task") == "causal-lm":
        raise DataError(f"{run_dir}: predict labels text with a classifier; this run is a causal LM")
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"{output_path}: output would overwrite the input")
    records = [r for _, r in read_records(input_path)]
    for i, r in enumerate(records, start=1):
        if not isinstance(r.get("text"), str):
            raise DataError(f'{input_path}:{i}: each line needs a string "text" field')
    if not records:
        raise DataError(f"{input_path}: no input lines")
    graphdef, params, meta, m, _ = load_run_model(run_dir, step)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(meta["source"]["path"])
    max_length = meta["config"]["data"]["max_length"]
    dp = mesh.data_parallel_size(m)
    batch_size = -(-batch_size // dp) * dp
    fn = compile.jit_predict_step(graphdef, jax.tree.map(lambda x: x.sharding, params), m)
    labels = meta["label_names"]
    token_level = meta["spec"]["task"] == "token-classification"
    outputs = []
    for start in range(0, len(records), batch_size):
        texts = [r["text"] for r in records[start : start + batch_size]]
        pad = batch_size - len(texts)
        inputs = [t.split() or [""] for t in texts + [""] * pad] if token_level else texts + [""] * pad
        enc = tokenizer(
            inputs,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
            return_token_type_ids=True,
            is_split_into_words=token_level,
        )
        batch = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
        probs = np.asarray(jax.device_get(fn(params, mesh.make_global_batch(batch, m))))
        for i in range(len(texts)):
            outputs.append(
                _word_outputs(enc.word_ids(i), probs[i], labels) if token_level else _output(probs[i], labels)
            )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output_path.parent, prefix=f".{output_path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r, out in zip(records, outputs):
            f.write(json.dumps({**r, **out}) + "\n")
    os.replace(tmp, output_path)
    return len(records)


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
