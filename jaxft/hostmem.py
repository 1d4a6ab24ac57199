"""glibc malloc settings for processes that run XLA:CPU, applied once at start by the CLI (and the benchmarks).

XLA:CPU gives each execution one scratch block for all of its temporaries (1.4 GB for a MiniLM train step at
batch 32 x 128), taken with posix_memalign on a worker thread. glibc serves a block that large from a fresh
mmap and unmaps it on free, so every step faults the whole block back in page by page: about 350,000 minor
faults and 0.7 s of kernel time per 2.2 s step on a 2-core CPU. With every thread on the main arena, no mmap
for large blocks, and the heap kept up to 2 GiB instead of trimmed, the next step reuses the same pages.

The price: the process holds on to its peak heap, and its threads share one arena. Neither matters to a
training process on the CPU; on an accelerator host the device holds the tensors and the host runs the data
pipeline, so nothing is changed where JAX may pick an accelerator (one is attached, or JAX_PLATFORMS names one).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import sys

ENV = "JAXFT_HOST_MALLOC"  # "0": leave malloc alone; "1": tune even where an accelerator plugin is installed
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8  # glibc's <malloc.h>
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: the most free heap kept at the top instead of returned


def tune_malloc_for_xla_cpu() -> str:
    """Applies the settings if this process will run XLA on the CPU and has not started it yet.
    Returns "tuned", or "untouched: <why>"."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return f"untouched: {ENV}={setting}"
    if not sys.platform.startswith("linux"):
        return "untouched: not Linux"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return "untouched: not glibc"
    if _backends_started():
        return "untouched: JAX's backends already started, so their threads have their own arenas"
    if setting not in ("1", "on", "true", "yes"):
        accelerator = _accelerator_possible()
        if accelerator:
            return f"untouched: JAX may run on an accelerator ({accelerator})"
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_TOP_PAD, KEEP_BYTES))
    failed = [param for param, value in settings if libc.mallopt(param, value) != 1]
    return f"untouched: mallopt refused parameters {failed}" if failed else "tuned"


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True  # cannot tell: assume the worst and change nothing


def _accelerator_possible() -> str | None:
    """What points to an accelerator: JAX_PLATFORMS naming one, or a TPU or GPU attached to this host. An
    installed plugin alone does not: a CPU laptop with the `tpu` extra (for `plan --target`) keeps its speed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return None if platforms == "cpu" else f"JAX_PLATFORMS={platforms}"
    attached = attached_accelerators()
    return f"a {'/'.join(attached)} device is attached" if attached else None


def attached_accelerators() -> list[str]:
    """The accelerator kinds whose device files this host has: TPU VMs expose /dev/accel* (v2-v5e) or
    /dev/vfio/<n> (v5p, v6e); NVIDIA GPUs /dev/nvidia<n>; AMD GPUs /dev/kfd."""
    found = []
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        found.append("tpu")
    if glob.glob("/dev/nvidia[0-9]*"):
        found.append("gpu")
    if os.path.exists("/dev/kfd"):
        found.append("rocm")
    return found


def keep_jax_off_absent_tpu() -> str:
    """With libtpu installed but no TPU attached, JAX loads libtpu at start-up and libtpu, looking for its VM's
    metadata, prints warnings. This names the CPU platform (unless JAX_PLATFORMS is set or a device is attached)
    and gives libtpu the values it looks for, so it stays quiet; `plan --target` still compiles for any TPU
    slice (the accelerator type set here does not bound the topologies it can build). Returns what it did."""
    if os.environ.get("JAX_PLATFORMS") or attached_accelerators():
        return "left alone"
    try:
        importlib.metadata.distribution("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "left alone: no libtpu"
    os.environ["JAX_PLATFORMS"] = "cpu"
    for key, value in TPU_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return "JAX_PLATFORMS=cpu: libtpu is installed but no TPU is attached"


# What libtpu reads from a TPU VM's metadata server, set on a host that is no TPU VM.
TPU_QUIET_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    # No chip to share: several processes may compile for TPUs at once (libtpu otherwise holds a lockfile).
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
