"""hostmem: glibc malloc kept from mmapping and unmapping XLA:CPU's per-step scratch block.

Each case runs in a fresh interpreter: the settings are process-wide, and they only apply before JAX's CPU
backend starts (this test process has started it long ago).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc >= 2.33 (mallinfo2) only",
)

# Tunes (or not), then takes and frees a 256 MiB block as XLA:CPU takes its scratch, and reports where glibc put
# it: `mmapped` counts live mmapped blocks while it is held, `heap_after_free` is what the heap kept after free.
PROBE = """
import ctypes, json, sys
from jaxft import hostmem
if sys.argv[1] == "start-jax":
    import jax
    jax.devices()
result = hostmem.tune_malloc_for_xla_cpu()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
before = libc.mallinfo2().hblks
block = ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(block), 64, 256 << 20) == 0
held = libc.mallinfo2()
libc.free(block)
print(json.dumps({"result": result, "mmapped": held.hblks - before, "heap_after_free": libc.mallinfo2().arena}))
"""


def probe(env: dict[str, str], mode: str = "") -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "JAXFT_HOST_MALLOC"}, "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_serves_a_large_block_from_the_heap_and_keeps_it():
    r = probe({})
    assert r["result"] == "tuned"
    assert r["mmapped"] == 0
    assert r["heap_after_free"] >= 256 << 20  # still mapped for the next step


def test_untuned_process_mmaps_the_block_as_glibc_does_by_default():
    r = probe({"JAXFT_HOST_MALLOC": "0"})
    assert r["result"] == "untouched: JAXFT_HOST_MALLOC=0"
    assert r["mmapped"] == 1
    assert r["heap_after_free"] < 256 << 20


def test_nothing_changes_once_jax_has_started_its_backend():
    r = probe({}, "start-jax")
    assert r["result"].startswith("untouched: JAX's backends already started")
    assert r["mmapped"] == 1


def test_an_accelerator_platform_is_left_alone_unless_forced():
    r = probe({"JAX_PLATFORMS": "tpu"})
    assert r["result"] == "untouched: JAX may run on an accelerator (JAX_PLATFORMS=tpu)"
    assert r["mmapped"] == 1
    assert probe({"JAX_PLATFORMS": "tpu", "JAXFT_HOST_MALLOC": "1"})["result"] == "tuned"


def test_an_installed_libtpu_without_a_tpu_neither_probes_nor_stops_tuning():
    """A CPU host with the tpu extra (libtpu, for `plan --target`): the CLI's start-up names the CPU platform,
    so JAX does not probe for a TPU (libtpu would print its failure), and malloc is still tuned."""
    import importlib.metadata

    from jaxft import hostmem

    if hostmem.attached_accelerators():
        pytest.skip("an accelerator is attached to this host")
    try:
        importlib.metadata.distribution("libtpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("libtpu is not installed")
    code = (
        "import os, json\nfrom jaxft import hostmem\nwhat = hostmem.keep_jax_off_absent_accelerators()\n"
        "tuned = hostmem.tune_malloc_for_xla_cpu()\nimport jax\n"
        "print(json.dumps([what, tuned, os.environ['JAX_PLATFORMS'], jax.devices()[0].platform]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAXFT_HOST_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    what, tuned, platforms, platform = json.loads(out.stdout.strip().splitlines()[-1])
    assert what.endswith("JAX_PLATFORMS=cpu: libtpu is installed but no TPU is attached"), what
    assert platforms == "cpu" and platform == "cpu"
    assert tuned == "tuned"
    assert "TPU" not in out.stderr, out.stderr[-2000:]
    assert "cuda" not in out.stderr.lower(), out.stderr[-2000:]  # the CUDA plugin (gpu-plan extra) is held back
