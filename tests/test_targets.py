"""Compile targets and `jaxft plan --target`: TPU slices named as gcloud names them, compiled for through libtpu on
this CPU host; the compiled step's per-device bytes against the chip's HBM; advice; bad targets."""

import json

import pytest

from jaxft import targets
from jaxft.config import load_config
from jaxft.plan import plan_target, render_target
from tests.fixtures import LLAMA_31_8B, ROOT, SFT_ARGS, one_line_error, run_cli, save_tiny_chat_model

libtpu = pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles TPU programs")


@pytest.mark.parametrize(
    "name, topology",
    [
        ("v5litepod-4", "v5e:2x2"),
        ("v5litepod-8", "v5e:2x4"),
        ("v5litepod-256", "v5e:16x16"),
        ("v6e-16", "v6e:4x4"),
        ("v5p-8", "v5p:2x2x1"),  # v5p and v4 count TensorCores, two per chip
        ("v5p-16", "v5p:2x2x2"),
        ("v5p-128", "v5p:4x4x4"),
        ("v4-8", "v4:2x2x1"),
        ("v5e:2x2", "v5e:2x2"),
        ("v5p:2x2x1", "v5p:2x2x1"),
    ],
)
def test_accelerator_types_and_topologies(name, topology):
    chip, got = targets.parse_tpu_target(name)
    assert got == topology and topology.startswith(chip.name + ":")


@pytest.mark.parametrize("name", ["v9-8", "v5litepod-3", "v5p-7", "v5e:2x2x1", "v5p:2x2", "tpu", "v5e:0x2"])
def test_bad_target_names(name):
    with pytest.raises(targets.TargetError):
        targets.parse_tpu_target(name)


def test_a_slice_has_one_device_per_chip():
    for name, chips, kind in [("v5litepod-4", 4, "TPU v5 lite"), ("v4-8", 4, "TPU v4"), ("v5p-16", 8, "TPU v5")]:
        t = targets.resolve_target(name)
        assert (len(t.devices), t.devices[0].device_kind, t.platform) == (chips, kind, "tpu"), name


def test_local_target_is_this_hosts_devices():
    t = targets.resolve_target("local")
    assert t.platform == "cpu" and len(t.devices) == 8 and t.hbm_bytes > 0 and t.peak_flops is None


# The MiniLM full fine-tune (configs/tiny.py) and a tiny Llama LoRA SFT, each compiled for two TPU slices.
@pytest.fixture(scope="module")
def tiny_llama_lora(tmp_path_factory):
    model = save_tiny_chat_model(tmp_path_factory.mktemp("chat"))
    overrides = [f"model.source={model}", *(a for a in SFT_ARGS if not a.startswith("mesh."))]
    return load_config(ROOT / "configs" / "llama_sft_lora.py", overrides)


@pytest.mark.parametrize("target", ["v5e:2x2", "v5p:2x2x1"])
def test_minilm_full_fine_tune_compiles_for_tpu_and_fits(target, data_dir):
    cfg = load_config(ROOT / "configs" / "tiny.py", ["mesh.data=4"])
    r = plan_target(cfg, target)
    pd = r["per_device"]
    assert r["compiled"] and r["fits"] and r["advice"] == [] and r["devices"] == 4
    assert r["compute_dtype"] == "bfloat16" and r["attention"] == "xla"  # model.compute_dtype=auto on a TPU
    assert pd["peak_bytes"] == pd["argument_bytes"] + pd["output_bytes"] - pd["alias_bytes"] + pd["temp_bytes"]
    assert 0 < pd["peak_bytes"] < r["hbm_bytes_per_device"] and r["margin_bytes"] > 0
    assert r["flops_per_step"] > 0 and r["est_step_seconds"] > 0
    # XLA's argument bytes are the state plan counts itself (parameters + optimizer state) plus the batch.
    tally = r["tallies_per_device"]["params"] + r["tallies_per_device"]["optimizer"]
    assert abs(pd["argument_bytes"] - tally) / tally < 0.05, (pd, r["tallies_per_device"])
    assert "fits" in render_target(r)


@pytest.mark.parametrize("target", ["v5e:2x2", "v5p:2x2x1"])
def test_tiny_llama_lora_compiles_for_tpu(target, tiny_llama_lora):
    r = plan_target(tiny_llama_lora.derive(mesh={"data": 2, "fsdp": 2}), target)
    assert r["compiled"] and r["fits"] and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    tallies = r["tallies_per_device"]
    assert 0 < tallies["grads"] < tallies["params"]  # adapters only train


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    """Llama-3.1-8B's config.json and nothing else: plan reads no weights."""
    folder = tmp_path_factory.mktemp("llama_8b")
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return folder


# Rows of 256 tokens, 4 a step: the compiles stay well under a minute here; the verdicts are those of longer rows.
SHORT_ROWS = ["train.batch_size=4", "data.max_length=256"]


def test_llama_8b_full_fine_tune_does_not_fit_a_v5litepod_4_and_gets_checked_advice(llama_8b):
    """XLA stops the full fine-tune's compile, plan says by how much, and plans again with changes until one
    fits: all devices on fsdp, with remat and LoRA over a bf16 base."""
    cfg = load_config(ROOT / "configs" / "tiny.py", [f"model.source={llama_8b}", "model.task=causal-lm", *SHORT_ROWS])
    r = plan_target(cfg, "v5litepod-4")
    assert r["compiled"] is False and r["fits"] is False and r["margin_bytes"] < 0
    tallies = r["tallies_per_device"]
    assert tallies["params"] > 29 * 2**30  # 8.0e9 fp32 parameters, replicated over data=4
    assert r["per_device"]["argument_bytes"] >= tallies["params"] + tallies["optimizer"]
    advice = r["advice"]
    assert advice[0].startswith("mesh.data=1 mesh.fsdp=4 → ") and advice[0].endswith("does not fit")
    assert advice[-1].endswith(", fits") and "lora.rank=16" in advice[-1] and "mesh.fsdp=4" in advice[-1]
    assert all(", fits" not in a for a in advice[:-1])  # planning stops at the first change that fits
    assert "does NOT fit" in render_target(r) and advice[-1] in render_target(r)


def test_llama_8b_lora_fits_a_v5p_8(llama_8b):
    overrides = [f"model.source={llama_8b}", *SHORT_ROWS]
    r = plan_target(load_config(ROOT / "configs" / "llama_sft_lora.py", overrides), "v5p-8")
    assert r["compiled"] and r["fits"] and r["devices"] == 4 and r["advice"] == []
    assert 8 * 2**30 < r["per_device"]["peak_bytes"] < 95 * 2**30  # the bf16 base alone is 15 GiB, replicated
    assert r["tallies_per_device"]["grads"] < 2**30  # adapters only
    # Forward and activation-gradient matmuls over ~7e9 weights and a row of 256 tokens a device, every one of
    # the 32 scanned layers counted (XLA's cost analysis counts the scan's body once).
    assert r["flops_per_step"] > 2 * 2 * 7.0e9 * 256


def test_unknown_target_is_one_line_listing_valid_ones(capsys, data_dir):
    line = one_line_error(["plan", str(ROOT / "configs" / "tiny.py"), "--target", "v9-8"], capsys)
    assert "unknown target 'v9-8'" in line and "v5litepod-4" in line and "v5p:2x2x1" in line


def test_mesh_that_does_not_divide_the_target_is_one_line(capsys, data_dir):
    line = one_line_error(["plan", str(ROOT / "configs" / "tiny.py"), "--target", "v5e:2x2", "mesh.data=8"], capsys)
    assert "mesh:" in line and "4 devices" in line


def test_plan_target_json_from_the_cli(tmp_path, data_dir):
    r = run_cli("plan", ROOT / "configs" / "tiny.py", "--target", "v5e:2x2", "mesh.data=4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    keys = {"target", "devices", "per_device", "hbm_bytes_per_device", "fits", "advice", "flops_per_step"}
    assert keys <= set(report) and report["fits"] is True
    assert {"argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes"} <= set(report["per_device"])
    assert "TPU" not in r.stderr, r.stderr[-2000:]  # libtpu stays quiet on a host that is no TPU VM


def test_target_without_libtpu_names_the_install_command(capsys, monkeypatch, data_dir):
    monkeypatch.setitem(__import__("sys").modules, "libtpu", None)  # `import libtpu` now fails
    line = one_line_error(["plan", str(ROOT / "configs" / "tiny.py"), "--target", "v5p-8"], capsys)
    assert "needs libtpu" in line and "pip install 'jaxft[tpu]'" in line


def test_unsupported_architecture_is_one_line(tmp_path, capsys, data_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    args = ["plan", str(ROOT / "configs" / "tiny.py"), "--target", "v5e:2x2", f"model.source={tmp_path}"]
    line = one_line_error(args, capsys)
    assert "t5" in line, line


def test_scan_layers_auto_scans_on_tpus_and_not_on_cpus():
    from jaxft import setup
    from jaxft.config import ModelConfig

    tpu = targets.resolve_target("v5e:2x2").devices
    assert setup.scan_layers(ModelConfig(), tpu) is True
    assert setup.scan_layers(ModelConfig()) is False  # this machine's CPU devices
    assert setup.scan_layers(ModelConfig(scan_layers="true")) is True
    assert setup.scan_layers(ModelConfig(scan_layers=False), tpu) is False
