"""Decoders through the engine's own loader: `jaxft.load(..., task="causal-lm")` places every HF tensor (a sharded
index too, stacked under scan or per layer) straight into its sharding on an 8-device mesh, and the logits equal
transformers'. Missing and mis-shaped tensors fail with one error; the plan covers decoders."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config

import jaxft
from jaxft.config import Config, ModelConfig
from jaxft.load import CheckpointError
from jaxft.models import ArchitectureError, GPT2Model, LlamaModel
from jaxft.plan import describe_plan
from tests.fixtures import llama_family, save_tiny_gpt2, save_tiny_llama, token_ids, torch_logits

L = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for name in ("llama", "qwen2"):  # llama: a sharded index and llama3 rope; qwen2: tied embeddings, biases
        config, kwargs = llama_family(name)
        out[name] = save_tiny_llama(root / name, config, **kwargs)
    out["gpt2"] = save_tiny_gpt2(root / "gpt2", max_shard_size="100KB")
    return out


def mesh_2x2x2() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("scan", [True, False])
def test_load_matches_pytorch_on_a_sharded_mesh(folders, name, scan):
    model = jaxft.load(str(folders[name]), task="causal-lm", mesh=mesh_2x2x2(), scan_layers=scan)
    assert isinstance(model, GPT2Model if name == "gpt2" else LlamaModel)
    assert model.spec.scan_layers == scan
    # Really sharded: an embedding split over fsdp (and vocab over tensor), not copied whole to each device.
    embed = model.wte if name == "gpt2" else model.embed_tokens
    assert len({tuple((s.start, s.stop) for s in sh.index) for sh in embed[...].addressable_shards}) > 1
    input_ids = token_ids(2, L, seed=7) % 1000
    expected = torch_logits(folders[name], input_ids)
    ours = np.asarray(jax.jit(lambda ids: model(ids))(input_ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_missing_and_mis_shaped_tensors_are_one_error(folders, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((folders["qwen2"] / "config.json").read_text())
    tensors = load_file(str(folders["qwen2"] / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = np.ones((7,), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        jaxft.load(str(folder), task="causal-lm")
    message = str(e.value)
    assert "missing model.layers.1.mlp.up_proj.weight" in message
    assert "mis-shaped model.norm.weight: expected [64], found [7]" in message


def test_decoder_refuses_a_classification_task(folders):
    with pytest.raises(ArchitectureError, match="does not support model.task='sequence-classification'"):
        jaxft.load(str(folders["gpt2"]), task="sequence-classification")


def test_plan_covers_decoders(folders):
    cfg = Config(model=ModelConfig(source=str(folders["llama"]), task="causal-lm", scan_layers="true"))
    text = describe_plan(cfg)
    assert "layers/self_attn/q_proj/kernel" in text and "[3, 64, 4, 16]" in text
    assert "per-device memory" in text
    # model.scan_layers=auto on this CPU: a row per layer.
    unrolled = describe_plan(Config(model=ModelConfig(source=str(folders["llama"]), task="causal-lm")))
    assert "layers/2/self_attn/q_proj/kernel" in unrolled and "[64, 4, 16]" in unrolled


def test_gpt2_config_from_transformers_reads(tmp_path):
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    from jaxft.models import gpt2_hf

    spec = gpt2_hf.spec_from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (2, 16, 64)
