"""Test setup: 8 fake CPU devices (before jax is imported), an XLA cache and a tfds data_dir per session, and the
session fixtures: a tiny BERT checkpoint and the real MiniLM folder. Shared helpers live in tests/fixtures.py."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (the test extra has it, for `plan --target`) stays quiet on this TPU-less host, as under the CLI.
from jaxft import hostmem  # noqa: E402  (import jaxft holds the CUDA plugin back before importing jax)

hostmem.keep_jax_off_absent_accelerators()
# One persistent XLA cache for the session (and the CLI subprocesses it starts, which inherit the
# environment): tests that build the same tiny model's step compile it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxft-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# This process imported JAX above (through jaxft), before these variables were set: JAX reads them at import,
# so the in-process runs get them here, before anything compiles (JAX decides once whether to use the cache).
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes", int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"])
)

from pathlib import Path  # noqa: E402  (the environment above comes first)

import pytest  # noqa: E402

from tests.fixtures import minilm_path, save_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


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
