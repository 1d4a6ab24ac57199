"""export_run: HF folders that transformers loads with jaxft's own predictions, bit-exact frozen tensors,
sharded and bf16 files, and refusals that leave existing files alone."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jaxft.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    FreezeConfig,
    LoadConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
)
from jaxft.export import ExportError, export_run, plan_tensors
from jaxft.models import BertSpec, bert_hf, build_abstract_model, family_for_spec
from jaxft.predict import predict_file
from jaxft.safetensors_out import SafetensorsWriter
from jaxft.train import train
from tests.fixtures import TOKENIZER_FILES, fail_third_write, save_tiny_bert

MAX_LENGTH = 16
TEXTS = ["a good review", "bad, truly bad", "meh it was fine I guess", "good good good"]
LABELS = ["bad", "good", "meh"]
REPO = Path(__file__).resolve().parent.parent


def _train_run(folder: Path, run_dir: Path, task: str = "sequence-classification", **cfg_kwargs) -> Path:
    """A 2-step run on a tiny checkpoint, over a (2, 2, 2) mesh so every parameter is really sharded."""
    rows = (
        [{"words": ["alice", "visited", "paris"], "tags": ["PER", "O", "LOC"]}] * 8
        if task == "token-classification"
        else [{"text": f"review {i} {LABELS[i % 3]}", "label": LABELS[i % 3]} for i in range(24)]
    )
    data = run_dir.parent / f"{run_dir.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = dict(text_column="words", label_column="tags") if task == "token-classification" else {}
    cfg = Config(
        model=ModelConfig(source=str(folder), task=task),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        train=TrainConfig(max_steps=2, batch_size=8, eval_every_steps=0, eval_batch_size=8),
        data=DataConfig(
            dataset="files", train_files=(str(data),), eval_files=(str(data),), max_length=MAX_LENGTH, **columns
        ),
        checkpoint=CheckpointConfig(every_steps=0),
        **cfg_kwargs,
    )
    train(cfg, run_dir)
    return run_dir


def _jaxft_probs(run_dir: Path, texts: list[str], tmp: Path) -> list:
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    predict_file(run_dir, inp, out, batch_size=8)
    return [json.loads(line)["probs"] for line in out.read_text().splitlines()]


def _hf_probs(folder: Path, texts: list[str], token_level: bool = False) -> list:
    """Probabilities from transformers' own class for the export; fails on any missing or unexpected key."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    auto = AutoModelForTokenClassification if token_level else AutoModelForSequenceClassification
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = [t.split() for t in texts] if token_level else texts
    enc = tokenizer(
        inputs,
        padding="max_length",
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
        is_split_into_words=token_level,
    )
    with torch.no_grad():
        probs = torch.softmax(model.eval()(**enc).logits.float(), -1).numpy()
    if not token_level:
        return probs.tolist()
    out = []
    for i in range(len(texts)):
        firsts = {}
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in firsts:
                firsts[w] = probs[i, j].tolist()
        out.append([firsts[w] for w in sorted(firsts)])
    return out


def _raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """(dtype code, shape, raw bytes) of every tensor, read straight from the file layout."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__")
    start = 8 + n
    return {
        k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0] : start + v["data_offsets"][1]])
        for k, v in header.items()
    }


def _no_leftovers(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory, tiny_bert, data_dir) -> Path:
    """3 labels (a fresh head), embeddings and layer 0 frozen."""
    rules = ((r"embeddings/.*", "freeze"), (r"encoder/layers/0/.*", "freeze"), (r".*", "train"))
    return _train_run(tiny_bert, tmp_path_factory.mktemp("seq") / "run", freeze=FreezeConfig(rules=rules))


@pytest.fixture(scope="module")
def seq_export(seq_run) -> Path:
    return export_run(seq_run, seq_run.parent / "export")


@pytest.fixture(scope="module")
def seq_probs(seq_run) -> list:
    return _jaxft_probs(seq_run, TEXTS, seq_run.parent)


def test_sequence_export_loads_in_transformers_with_jaxft_probabilities(seq_export, seq_probs):
    from safetensors import safe_open

    names = sorted(p.name for p in seq_export.iterdir())
    assert names == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    config = json.loads((seq_export / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "meh"}
    assert config["label2id"] == {"bad": 0, "good": 1, "meh": 2}
    assert config["num_labels"] == 3 and config["dtype"] == config["torch_dtype"] == "float32"
    with safe_open(str(seq_export / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("classifier.weight").shape == (3, 32)
    np.testing.assert_allclose(_hf_probs(seq_export, TEXTS), seq_probs, atol=1e-4)


def test_frozen_tensors_are_bit_identical_to_the_source(seq_export, tiny_bert):
    source = _raw_tensors(tiny_bert / "model.safetensors")
    exported = _raw_tensors(seq_export / "model.safetensors")
    frozen = [k for k in source if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    assert len(frozen) == 5 + 16  # every layout kind: copy, flat (q/k/v bias), linear1, linear2 (attention out)
    for key in frozen:
        assert exported[key] == source[key], key
    trained = "bert.encoder.layer.1.intermediate.dense.weight"
    assert exported[trained][:2] == source[trained][:2] and exported[trained][2] != source[trained][2]


def test_sharded_export_has_an_index_and_loads_the_same(seq_run, seq_export, seq_probs, tmp_path):
    out = export_run(seq_run, tmp_path / "sharded", max_shard_bytes=1_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    whole = _raw_tensors(seq_export / "model.safetensors")
    pieces = {}
    for name in shards:
        part = _raw_tensors(out / name)
        assert all(index["weight_map"][k] == name for k in part)
        assert sum(len(v[2]) for v in part.values()) <= 1_000_000 or len(part) == 1
        pieces.update(part)
    assert pieces == whole
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in whole.values())
    np.testing.assert_allclose(_hf_probs(out, TEXTS), seq_probs, atol=1e-4)


def test_bfloat16_export_is_the_rounded_float32_export(seq_run, seq_export, seq_probs, tmp_path):
    out = export_run(seq_run, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    bf16, f32 = _raw_tensors(out / "model.safetensors"), _raw_tensors(seq_export / "model.safetensors")
    for key, (code, shape, raw) in bf16.items():
        assert code == "BF16" and shape == f32[key][1]
        assert raw == np.frombuffer(f32[key][2], np.float32).astype(ml_dtypes.bfloat16).tobytes(), key
    np.testing.assert_allclose(_hf_probs(out, TEXTS), seq_probs, atol=3e-2)


def test_roberta_export_loads_without_a_pooler(tmp_path, data_dir):
    run = _train_run(save_tiny_bert(tmp_path / "tiny", family="roberta"), tmp_path / "run")
    out = export_run(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaForSequenceClassification"]
    keys = _raw_tensors(out / "model.safetensors")
    assert "classifier.out_proj.weight" in keys and not any(".pooler." in k for k in keys)
    np.testing.assert_allclose(_hf_probs(out, TEXTS), _jaxft_probs(run, TEXTS, tmp_path), atol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert"])
@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_planned_tensors_are_exactly_the_transformers_class_state_dict(model_type, task):
    """Every family and task without training: keys and shapes against the real class, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    dims = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = AutoConfig.for_model(model_type, **dims, num_labels=3)
    auto = AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    spec = bert_hf.spec_from_hf_config(config.to_dict(), task, 3)
    _, abstract = build_abstract_model(spec)
    tensors = plan_tensors(abstract, spec, model_type, np.dtype(np.float32), Path("run"))
    assert {t.key: t.shape for t in tensors} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert family_for_spec(spec).hf_class_name(spec, model_type) == type(model).__name__


def test_a_parameter_the_hf_class_lacks_is_an_error():
    spec = BertSpec(vocab_size=99, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, num_labels=2)
    _, abstract = build_abstract_model(spec)
    token_spec = dataclasses.replace(spec, task="token-classification")  # its HF class has no pooler
    with pytest.raises(ExportError, match=r"BertForTokenClassification: bert.pooler.dense.bias is not a tensor"):
        plan_tensors(abstract, token_spec, "bert", np.dtype(np.float32), Path("run"))
    _, token_abstract = build_abstract_model(token_spec)
    with pytest.raises(ExportError, match=r"needs bert.pooler.dense.bias, which the run has no parameter"):
        plan_tensors(token_abstract, spec, "bert", np.dtype(np.float32), Path("run"))


def test_token_classification_export_loads_with_per_word_probabilities(tmp_path, tiny_bert, data_dir):
    load = LoadConfig(new_params=(r"classifier/.*",), ignore_unused=(r"bert\.pooler\..*", r"classifier\..*"))
    run = _train_run(tiny_bert, tmp_path / "run", task="token-classification", load=load)
    out = export_run(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "LOC", "1": "O", "2": "PER"}
    texts = ["carol visited rome", "bob likes berlin today"]
    expected = _jaxft_probs(run, texts, tmp_path)
    got = _hf_probs(out, texts, token_level=True)
    assert [len(w) for w in got] == [3, 4]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-4)


def test_refusals_leave_existing_files_untouched(seq_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(seq_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_run(seq_run, tmp_path / "file")
    with pytest.raises(ExportError, match="no run.json"):
        export_run(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ExportError, match="unknown dtype"):
        export_run(seq_run, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path / "out")


def test_empty_out_dir_is_filled(seq_run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert (export_run(seq_run, tmp_path / "empty") / "model.safetensors").is_file()


def test_a_failure_midway_leaves_no_folder(seq_run, tmp_path, monkeypatch):
    fail_third_write(monkeypatch)
    with pytest.raises(ExportError, match="No space left"):
        export_run(seq_run, tmp_path / "out", max_shard_bytes=1_000_000)
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path / "out")


def test_safetensors_writer_round_trips_and_checks_order(tmp_path):
    from safetensors.numpy import load_file

    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    b = np.asarray([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    path = tmp_path / "t.safetensors"
    with SafetensorsWriter(path, [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)]) as w:
        with pytest.raises(ValueError, match="expected"):
            w.write("b", b)
        w.write("a", a)
        w.write("b", b)
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["a"], a)
    assert loaded["b"].tobytes() == b.tobytes()
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0
    with pytest.raises(ValueError, match="closed before"):
        with SafetensorsWriter(tmp_path / "u.safetensors", [("a", a.shape, a.dtype)]):
            pass


def test_cli_export_writes_then_refuses(seq_run, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "jaxft.cli", "export", str(seq_run), str(out), "--dtype", "float16"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported step 2" in done.stdout
    assert {v[0] for v in _raw_tensors(out / "model.safetensors").values()} == {"F16"}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(f"jaxft: error: {out}: already exists and is not empty")


_TWO_PROCESS = """
import os, sys
from pathlib import Path
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jaxft.export import export_run
export_run(Path(sys.argv[3]), Path(sys.argv[4]))
"""


def test_two_process_export_equals_the_single_process_one(seq_run, seq_export, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = tmp_path / "mp"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS, address, str(i), str(seq_run), str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # a process left waiting in a collective: do not leave it behind
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert _raw_tensors(out / "model.safetensors") == _raw_tensors(seq_export / "model.safetensors")
    assert (out / "config.json").read_text() == (seq_export / "config.json").read_text()
