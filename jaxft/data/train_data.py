"""A run's data, whatever its task: the label names and sources first (the model's head shape needs them), then the
tokenizer-bound train iterator and eval batches once the pretrained folder is known."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxft import mesh as mesh_lib
from jaxft.config import Config, length_buckets
from jaxft.data import image_pipeline, lm, pipeline

log = logging.getLogger("jaxft.data")


class TrainData:
    """`label_names` and the sources on construction; `open(folder, vocab_size)` builds the encoder, the train
    dataset (a grain dataset whose iterator state is checkpointed) and `eval_batches` (a callable yielding every
    eval batch, or None without an eval split)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lm = cfg.model.task == "causal-lm"
        self.images = cfg.model.task == "image-classification"
        if self.images:
            self.sources: Any = image_pipeline.open_image_sources(cfg.data)
            self.label_names = self.sources.label_names
        elif self.lm:
            self.sources = lm.open_lm_sources(cfg.data)
            self.label_names: tuple[str, ...] = ()
        else:
            self.sources = pipeline.open_sources(cfg.data, task=cfg.model.task)
            self.label_names = self.sources.label_names
        self.train_dataset: Any = None
        self.eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
        self.eval_rows: mesh_lib.BatchRows | None = None  # this process's rows of each eval batch
        self.encoder: Any = None

    def open(self, folder: Path, spec: Any, mesh: Mesh) -> None:
        """Tokenizes with the pretrained folder's tokenizer (a causal LM's ids must fit the model `spec`'s
        vocabulary), or for images builds the transforms at the spec's image size with the folder's normalisation;
        each process reads its rows of every global batch over `mesh`."""
        cfg, data = self.cfg, self.cfg.data
        batch = mesh_lib.batch_rows(mesh, cfg.train.batch_size)
        eval_source, eval_batch = self.sources.eval, mesh_lib.batch_rows(mesh, cfg.train.eval_batch_size)
        self.train_rows, self.eval_rows = batch, eval_batch
        buckets = length_buckets(data)
        if self.images:
            self.encoder = image_pipeline.ImageTransforms.build(data, folder, spec.image_size)
            threads = image_pipeline.workers(data)
            self.train_dataset = image_pipeline.build_train_dataset(
                self.sources, self.encoder, batch, data.shuffle_seed, threads
            )
            if eval_source is not None:
                self.eval_batches = lambda: image_pipeline.iter_eval_batches(
                    self.sources, self.encoder.eval, eval_batch, threads
                )
            return
        if self.lm:
            self.encoder = lm.LMEncoder(folder, data, spec.vocab_size)
            self.train_dataset = lm.build_lm_train_dataset(
                self.sources.train, self.encoder, batch, data.shuffle_seed, data.max_length, data.packing, buckets
            )
            if eval_source is not None:
                self.eval_batches = lambda: lm.iter_lm_eval_batches(
                    eval_source, self.encoder, eval_batch, data.max_length, buckets
                )
            return
        self.encoder = pipeline.Encoder(folder, data.max_length, self.sources)
        self.train_dataset = pipeline.build_train_dataset(
            self.sources.train, self.encoder, batch, data.shuffle_seed, buckets
        )
        if eval_source is not None:
            lengths = self.encoder.lengths(eval_source) if buckets else None  # measured once, for every eval
            self.eval_batches = lambda: pipeline.iter_eval_batches(
                eval_source, self.encoder, eval_batch, buckets, lengths
            )

    @property
    def prompt_kind(self) -> str:
        """Causal LM: "text" when the run trains on plain text (a prompt continues as raw text), else "chat"
        (a prompt is a user turn plus the generation prompt), as its first train record says."""
        return pipeline.as_text(self.sources.train[0]["kind"]) if self.lm else ""

    def report(self) -> None:
        dropped = getattr(self.encoder, "dropped", 0)
        if dropped:
            log.warning(
                "data.truncation=drop: examples longer than data.max_length were skipped %d times "
                "(an example counts again on every pass over the data, eval included)",
                dropped,
            )
