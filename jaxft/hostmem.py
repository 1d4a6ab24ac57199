"""What a process sets up on its host before JAX starts: glibc malloc settings for processes that run XLA:CPU,
applied once at start by the CLI (and the benchmarks); and, on a host with no accelerator attached, keeping JAX
from probing for the TPU or GPU whose plugins are installed only to compile for them (`keep_jax_off_...`).

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

import contextlib
import ctypes
import glob
import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import types

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


_kept_off: str | None = None


def keep_jax_off_absent_accelerators() -> str:
    """Run once, by `import jaxft` (before it imports JAX); later calls return what the first one did.

    Keeps JAX on a host with no accelerator attached from probing for one it cannot use, which is noisy.

    With libtpu installed but no TPU attached, JAX loads libtpu at start-up and libtpu, looking for its VM's
    metadata, prints warnings. This names the CPU platform (unless JAX_PLATFORMS is set or a device is attached)
    and gives libtpu the values it looks for, so it stays quiet; `plan --target` still compiles for any TPU
    slice (the accelerator type set here does not bound the topologies it can build).

    With the JAX CUDA plugin installed but no GPU attached, JAX imports the plugin at start-up, which prints
    "could not find cuda drivers" four times; the plugin is held back until `plan --target h100` asks for it
    (`load_cuda_plugin`). Returns what it did."""
    global _kept_off
    if _kept_off is None:
        _kept_off = _keep_off()
    return _kept_off


def _keep_off() -> str:
    done = []
    cpu_only = os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("", "cpu")
    if cpu_only and "gpu" not in attached_accelerators() and (held := _hold_back_cuda_plugins()):
        done.append(f"held back {', '.join(held)}: no GPU is attached")
    if os.environ.get("JAX_PLATFORMS") or attached_accelerators():
        return "; ".join(done) or "left alone"
    try:
        importlib.metadata.distribution("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "; ".join(done) or "left alone: no libtpu"
    os.environ["JAX_PLATFORMS"] = "cpu"
    for key, value in TPU_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    return "; ".join([*done, "JAX_PLATFORMS=cpu: libtpu is installed but no TPU is attached"])


CUDA_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")  # the modules JAX's CUDA plugins install
CUDA_EXTENSIONS = ("jax_cuda13_plugin", "jax_cuda12_plugin")  # their native parts, which jaxlib imports itself


class _HeldBack(importlib.abc.MetaPathFinder):
    """While installed, the CUDA plugins' native packages cannot be imported (jaxlib, which tries them at
    `import jax`, goes on without them, as on a host without the plugin)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in CUDA_EXTENSIONS:
            raise ModuleNotFoundError(f"{fullname} is held back by jaxft: no GPU is attached", name=fullname)
        return None


_HELD_BACK = _HeldBack()


def _hold_back_cuda_plugins() -> list[str]:
    """Holds back each installed CUDA plugin until `load_cuda_plugin`: its native packages cannot be imported,
    and JAX's plugin discovery finds a stand-in with a no-op initialize(). Only works before JAX is imported."""
    if "jax" in sys.modules:
        return []
    held = []
    for name in CUDA_PLUGINS:
        try:
            found = name not in sys.modules and importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            stand_in = types.ModuleType(name, "held back by jaxft: no GPU is attached (hostmem.load_cuda_plugin)")
            stand_in.initialize = lambda: None
            stand_in.jaxft_held_back = True
            sys.modules[name] = stand_in
            held.append(name)
    if held and _HELD_BACK not in sys.meta_path:
        sys.meta_path.insert(0, _HELD_BACK)
    return held


def load_cuda_plugin() -> types.ModuleType | None:
    """The JAX CUDA plugin module, initialized (registered with JAX) if it was held back at start-up; None when
    no CUDA plugin is installed. Registering it after the CPU backend started is fine: JAX keeps a factory per
    platform and builds the CUDA one only when asked (here, for a compile-only topology)."""
    import jax

    jax.devices()  # JAX's plugin discovery runs once, with its backends: let it find the stand-ins first
    if _HELD_BACK in sys.meta_path:
        sys.meta_path.remove(_HELD_BACK)
    for name in CUDA_PLUGINS:
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "jaxft_held_back", False):
            return module
        sys.modules.pop(name, None)
        try:
            with dropping_stderr_lines():
                module = importlib.import_module(name)
                module.initialize()
        except ImportError:
            continue
        return module
    return None


CUDA_STUB_NOISE = ("cudart_stub", "absl::InitializeLog()")


@contextlib.contextmanager
def dropping_stderr_lines(noise: tuple[str, ...] = CUDA_STUB_NOISE):
    """Drops the lines holding any of `noise` that C++ writes to stderr meanwhile (by default the CUDA stub's
    "could not find cuda drivers" and absl's pre-init banner before each, which the CUDA plugin prints on a
    host with no GPU); everything else written meanwhile is kept."""
    if not noise:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [
                line
                for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                if not any(n in line for n in noise)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# What libtpu reads from a TPU VM's metadata server, set on a host that is no TPU VM.
TPU_QUIET_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    # No chip to share: several processes may compile for TPUs at once (libtpu otherwise holds a lockfile).
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
