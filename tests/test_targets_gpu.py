"""GPU compile targets (`jaxft plan --target h100-8`): compiled through the JAX CUDA plugin from a device
description, on this host with no GPU; the plugin held back at start-up so that it prints nothing; the matmul
FLOP count that plan's step-time estimate uses."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxft import hostmem, targets
from jaxft.config import load_config
from jaxft.plan import matmul_flops, plan_target, render_target
from tests.fixtures import LLAMA_31_8B, ROOT, one_line_error, run_cli

if hostmem.attached_accelerators():
    pytest.skip("an accelerator is attached: these tests compile for absent GPUs", allow_module_level=True)
try:
    import jax_plugins.xla_cuda12  # noqa: F401  (the stand-in, if held back: the plugin is installed either way)
except ImportError:
    pytest.skip("the gpu-plan extra (the JAX CUDA plugin) is not installed", allow_module_level=True)


@pytest.mark.parametrize(
    "name, gpu, hosts, per_host",
    [("h100", "h100", 1, 1), ("h100-8", "h100", 1, 8), ("h200-4", "h200", 1, 4), ("a100-16", "a100", 2, 8)],
)
def test_gpu_target_names(name, gpu, hosts, per_host):
    model, got_hosts, got_per_host = targets.parse_gpu_target(name)
    assert (model.name, got_hosts, got_per_host) == (gpu, hosts, per_host)


@pytest.mark.parametrize("name, message", [("h100-12", "multiple of 8"), ("h100-0", "at least 1")])
def test_bad_gpu_counts(name, message):
    with pytest.raises(targets.TargetError, match=message):
        targets.parse_gpu_target(name)


def test_gpu_devices_and_the_memory_jax_takes_of_them(monkeypatch):
    t = targets.resolve_target("a100-16")
    assert (len(t.devices), t.platform, t.topology) == (16, "gpu", "2x8 a100")
    assert t.devices[0].device_kind == "NVIDIA A100-SXM4-80GB" and {d.process_index for d in t.devices} == {0, 1}
    assert t.hbm_bytes == int(0.75 * 81920 * 2**20) and t.peak_flops == 312e12  # JAX's default 75%
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert targets.resolve_target("h200").hbm_bytes == int(0.9 * 143771 * 2**20)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    with pytest.raises(targets.TargetError, match="fraction"):
        targets.resolve_target("h200")


def test_minilm_full_fine_tune_compiles_for_h100s_and_fits(data_dir):
    cfg = load_config(ROOT / "configs" / "tiny.py", ["mesh.data=4"])
    r = plan_target(cfg, "h100-4")
    pd = r["per_device"]
    assert r["compiled"] and r["fits"] and r["advice"] == [] and (r["devices"], r["platform"]) == (4, "gpu")
    assert r["compute_dtype"] == "bfloat16" and r["attention"] == "xla"  # model.compute_dtype=auto on a GPU
    assert 0 < pd["peak_bytes"] < r["hbm_bytes_per_device"]
    tally = r["tallies_per_device"]["params"] + r["tallies_per_device"]["optimizer"]
    assert abs(pd["argument_bytes"] - tally) / tally < 0.05, (pd, r["tallies_per_device"])
    assert r["flops_per_step"] > 0 and r["est_step_seconds"] > 0


def test_llama_8b_full_fine_tune_does_not_fit_h100s_until_fsdp(tmp_path):
    """Data-parallel over 8 H100s each holds the fp32 weights and Adam's moments (96 GiB); FSDP over the 8
    shards them. The GPU compiler does not stop the compile (it warns, and plan drops the warning): the peak
    itself says it does not fit."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    overrides = [f"model.source={tmp_path}", "model.task=causal-lm", "train.batch_size=8", "data.max_length=256"]
    r = plan_target(load_config(ROOT / "configs" / "tiny.py", overrides), "h100-8")
    assert r["compiled"] and r["fits"] is False and r["per_device"]["peak_bytes"] > 90 * 2**30
    assert r["advice"][0].startswith("mesh.data=1 mesh.fsdp=8 → ") and r["advice"][0].endswith(", fits")
    # 2 FLOPs per multiply-add, forward and both backward products, over ~7e9 matmul weights and 256 tokens a
    # device: XLA's cost analysis would count one of the 32 scanned layers.
    assert r["flops_per_step"] > 3 * 2 * 7.0e9 * 256
    assert "does NOT fit" in render_target(r)


def test_matmul_flops_count_each_scanned_layer_and_the_remat_recompute():
    def layer(h, w):
        return jnp.tanh(h @ w), None

    def loss(x, ws):
        h, _ = jax.lax.scan(jax.checkpoint(layer), x, ws)
        return jnp.sum(h)

    traced = jax.jit(jax.grad(loss, argnums=1)).trace(jnp.ones((16, 64)), jnp.ones((8, 64, 64)))
    one = 2 * 16 * 64 * 64  # one layer's forward matmul
    assert matmul_flops(traced.jaxpr) == 8 * 4 * one  # forward, recompute, and the two backward products


def test_matmul_flops_count_the_branch_the_target_platform_compiles():
    """lax.platform_dependent stages every platform's branch; plan counts the one its target compiles (layers.matmul
    gives XLA:CPU an extra transposing matmul that TPU and GPU programs never carry)."""

    def f(x, w):
        return jax.lax.platform_dependent(x, w, cpu=lambda x, w: (x @ w) @ w, default=lambda x, w: x @ w)

    traced = jax.jit(f).trace(jnp.ones((16, 64)), jnp.ones((64, 64)))
    one = 2 * 16 * 64 * 64
    assert matmul_flops(traced.jaxpr, "cpu") == 2 * one
    assert matmul_flops(traced.jaxpr, "tpu") == matmul_flops(traced.jaxpr, "gpu") == one
    assert matmul_flops(traced.jaxpr) == 2 * one  # no platform given: the costliest


def test_plan_for_a_gpu_from_the_cli_prints_only_the_report(data_dir):
    r = run_cli("plan", ROOT / "configs" / "tiny.py", "--target", "h100-2", "mesh.data=2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert (report["platform"], report["devices"], report["fits"]) == ("gpu", 2, True)
    assert "cuda" not in r.stderr.lower() and "cache" not in r.stderr.lower(), r.stderr[-2000:]
    again = run_cli("plan", ROOT / "configs" / "tiny.py", "--target", "h100-2", "mesh.data=2", "--json")
    assert again.returncode == 0 and "cache" not in again.stderr.lower(), again.stderr[-2000:]


def test_gpu_target_without_the_plugin_names_the_install_command(capsys, monkeypatch, data_dir):
    monkeypatch.setattr(hostmem, "load_cuda_plugin", lambda: None)
    line = one_line_error(["plan", str(ROOT / "configs" / "tiny.py"), "--target", "h100-8"], capsys)
    assert "needs the JAX CUDA plugin" in line and "pip install 'jaxft[gpu-plan]'" in line
