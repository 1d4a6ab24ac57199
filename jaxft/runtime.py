"""Process-wide JAX settings the CLI applies at start, before any backend starts: the persistent XLA compilation
cache, and the XLA flags GPU runs want. (glibc malloc for XLA:CPU is hostmem.py's.)

The knobs are environment variables, listed with the others in the README's "Environment" table:
- JAXFT_XLA_CACHE: where compiled programs are kept across runs (default ~/.cache/jaxft/xla); "off" disables it.
  JAX's own JAX_COMPILATION_CACHE_DIR, when set, wins. A re-run, a resume, eval and predict then load the train
  and eval steps instead of compiling them again; a cached program is the same program, so results are unchanged.
- JAXFT_GPU_XLA_FLAGS: "0" leaves XLA_FLAGS alone on a GPU host.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxft import hostmem

CACHE_ENV = "JAXFT_XLA_CACHE"
DEFAULT_CACHE = Path("~/.cache/jaxft/xla")
OFF = ("0", "off", "false", "no", "none")

# Added to XLA_FLAGS where a GPU is attached (unless XLA_FLAGS already sets them). Each is a long-standing XLA
# GPU flag; an unknown one would stop XLA at start, so the list stays short.
GPU_XLA_FLAGS = (
    # Schedules the FSDP all-gathers and gradient reduce-scatters to overlap with compute instead of in between.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
)


def cache_dir() -> Path | None:
    """The compilation cache folder the settings name, or None when it is off."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    setting = os.environ.get(CACHE_ENV)
    if setting is not None and setting.strip().lower() in OFF + ("",):
        return None
    return Path(setting).expanduser() if setting else DEFAULT_CACHE.expanduser()


def configure_compilation_cache(compile_only: bool = False) -> str:
    """Turns JAX's persistent compilation cache on at cache_dir(), or, for a process that compiles for devices it
    does not have (`plan --target v5e:2x2`), off even where JAX_COMPILATION_CACHE_DIR names one: such a program
    cannot be loaded from the cache (XLA refuses it: "PjRtCompiler must be constructed with a Client"), so each
    entry would only be a warning at the next plan. Returns what it did."""
    import jax

    if compile_only:
        jax.config.update("jax_enable_compilation_cache", False)
        return "compilation cache off: compiling for a target this host does not have"
    folder = cache_dir()
    if folder is None:
        return f"compilation cache off ({CACHE_ENV})"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"compilation cache off: cannot create {folder} ({e.strerror})"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return f"compilation cache: {folder}"


def set_gpu_xla_flags() -> str:
    """GPU_XLA_FLAGS into XLA_FLAGS where a GPU is attached (before its backend starts). Returns what it did."""
    if "gpu" not in hostmem.attached_accelerators() or os.environ.get("JAXFT_GPU_XLA_FLAGS", "").lower() in OFF:
        return "GPU XLA flags: not set"
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return f"GPU XLA flags: {' '.join(added) or 'already set'}"
