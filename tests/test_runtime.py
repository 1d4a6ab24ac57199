"""runtime: the persistent XLA compilation cache's folder from the environment, and the GPU XLA flags."""

from pathlib import Path

from jaxft import hostmem, runtime


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAXFT_XLA_CACHE", raising=False)
    assert runtime.cache_dir() == Path("~/.cache/jaxft/xla").expanduser()
    monkeypatch.setenv("JAXFT_XLA_CACHE", str(tmp_path / "xla"))
    assert runtime.cache_dir() == tmp_path / "xla"
    for off in ("off", "0", ""):
        monkeypatch.setenv("JAXFT_XLA_CACHE", off)
        assert runtime.cache_dir() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own variable wins
    assert runtime.cache_dir() == tmp_path / "jax"


def test_cache_folder_that_cannot_be_made_turns_the_cache_off(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JAXFT_XLA_CACHE", str(tmp_path / "file" / "xla"))
    assert runtime.configure_compilation_cache().startswith("compilation cache off: cannot create")


def test_gpu_flags_only_where_a_gpu_is_attached_and_never_twice(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JAXFT_GPU_XLA_FLAGS", raising=False)
    monkeypatch.setattr(hostmem, "attached_accelerators", lambda: [])
    assert runtime.set_gpu_xla_flags() == "GPU XLA flags: not set"
    monkeypatch.setattr(hostmem, "attached_accelerators", lambda: ["gpu"])
    runtime.set_gpu_xla_flags()
    runtime.set_gpu_xla_flags()
    flags = __import__("os").environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"
    assert flags.count("--xla_gpu_enable_latency_hiding_scheduler=true") == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXFT_GPU_XLA_FLAGS", "0")
    assert runtime.set_gpu_xla_flags() == "GPU XLA flags: not set"
