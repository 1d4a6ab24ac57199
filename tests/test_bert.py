"""HF parity: jaxft logits equal transformers' PyTorch logits on the same weights."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import serialization
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

import jaxft
from tests.fixtures import TOKENIZER_FILES, minilm_path, save_tiny_bert

TEXTS = ["I loved this blender, it is great.", "Terrible service, never again!! not ok", "meh"]


def _encode(folder, max_length=24):
    tok = AutoTokenizer.from_pretrained(str(folder))
    return dict(tok(TEXTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"))


def _torch_logits(model, enc):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()


def test_minilm_matches_pytorch_bert_for_sequence_classification(minilm):
    model = jaxft.load(str(minilm), num_labels=3)
    enc = _encode(minilm)
    ours = np.asarray(
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"])
    )
    ref = BertForSequenceClassification.from_pretrained(str(minilm), num_labels=3).eval()
    with torch.no_grad():  # same (fresh) head weights on both sides
        ref.classifier.weight.copy_(torch.tensor(np.asarray(model.classifier.kernel[...]).T))
        ref.classifier.bias.copy_(torch.tensor(np.asarray(model.classifier.bias[...])))
    expected = _torch_logits(ref, enc)
    assert ours.shape == (3, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    assert np.abs(ours).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tiny_task_checkpoint_matches_pytorch(tmp_path, family):
    folder = save_tiny_bert(tmp_path / family, family=family, num_labels=2, seed=1)
    enc = _encode(folder, 16)
    if family == "roberta":
        enc.pop("token_type_ids")
        enc["input_ids"] = np.where(enc["attention_mask"] > 0, enc["input_ids"], 1)  # roberta pad id
    ours = np.asarray(jaxft.load(str(folder), num_labels=2)(**enc))
    expected = _torch_logits(AutoModelForSequenceClassification.from_pretrained(str(folder)).eval(), enc)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_sharded_safetensors_index_loads_the_same(tmp_path):
    single = save_tiny_bert(tmp_path / "single", seed=2)
    sharded = save_tiny_bert(tmp_path / "sharded", seed=2, max_shard_size="500KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    enc = _encode(single, 16)
    a = np.asarray(jaxft.load(str(single))(**enc))
    b = np.asarray(jaxft.load(str(sharded))(**enc))
    np.testing.assert_array_equal(a, b)


def _write_flax_msgpack(pt_folder, out_folder):
    """The layout HF's FlaxBertForSequenceClassification saved: [in, out] kernels, scale/embedding names."""
    from safetensors.numpy import load_file

    tensors = load_file(str(pt_folder / "model.safetensors"))
    tree = {}
    for key, value in tensors.items():
        parts = key.split(".")
        name = parts[-1]
        if name == "weight":
            if "embeddings" in parts[-2]:
                name = "embedding"
            elif "LayerNorm" in parts[-2]:
                name = "scale"
            else:
                name, value = "kernel", value.T
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[name] = np.ascontiguousarray(value)
    out_folder.mkdir()
    (out_folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    (out_folder / "config.json").write_text((pt_folder / "config.json").read_text())


def test_legacy_flax_msgpack_loads_the_same(tmp_path):
    pt = save_tiny_bert(tmp_path / "pt", seed=3)
    _write_flax_msgpack(pt, tmp_path / "flax")
    enc = _encode(pt, 16)
    a = np.asarray(jaxft.load(str(pt))(**enc))
    b = np.asarray(jaxft.load(str(tmp_path / "flax"))(**enc))
    np.testing.assert_array_equal(a, b)


def test_loaded_params_are_sharded_not_on_one_device(tiny_bert):
    from jaxft.config import MeshConfig
    from jaxft.mesh import build_mesh

    mesh = build_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    model = jaxft.load(str(tiny_bert), mesh=mesh)
    kernel = model.encoder.layers[0].up.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 64)  # embed dim split over fsdp=4
    assert jax.device_count() == 8


def test_token_classification_matches_pytorch(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(4)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,
    )
    ref = BertForTokenClassification(config).eval()
    ref.save_pretrained(tmp_path / "tok")
    for name in TOKENIZER_FILES:
        (tmp_path / "tok" / name).write_bytes((minilm_path() / name).read_bytes())
    enc = _encode(tmp_path / "tok", 16)
    ours = np.asarray(jaxft.load(str(tmp_path / "tok"), task="token-classification", num_labels=5)(**enc))
    assert ours.shape == (3, 16, 5)
    np.testing.assert_allclose(ours, _torch_logits(ref, enc), atol=1e-4, rtol=0)
