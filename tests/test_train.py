"""train() in-process on a tiny checkpoint: gradual unfreezing phases, eval metrics, saved checkpoints."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

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
from jaxft.evaluate import eval_run
from jaxft.paths import path_str
from jaxft.run_dir import restore_run
from jaxft.train import train


def _flat(state_part):
    return {path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state_part)}


def _files(tmp_path):
    rows = [{"text": f"review {i} {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gradual_unfreezing_trains_top_down_and_compiles_once_per_phase(tmp_path, tiny_bert, data_dir):
    from jaxft import setup

    train_file = _files(tmp_path)
    cfg = Config(
        model=ModelConfig(source=str(tiny_bert)),
        mesh=MeshConfig(data=8),
        freeze=FreezeConfig(rules=((r".*", "train"),), unfreeze_every_steps=2),
        train=TrainConfig(max_steps=3, batch_size=8, eval_every_steps=0, log_every_steps=1, eval_batch_size=8),
        data=DataConfig(dataset="files", train_files=(str(train_file),), eval_files=(str(train_file),), max_length=16),
        checkpoint=CheckpointConfig(every_steps=0),
    )
    result = train(cfg, tmp_path / "run")
    before = _flat(setup.load_weights(setup.build_model(cfg, setup.build_mesh(cfg), 2), cfg.model, cfg.load))
    after = {**_flat(result.state.trainable), **_flat(result.state.frozen)}
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    # Steps 0-1 train the head group; at step 2 layer 1 joins. Layer 0 and embeddings never trained.
    assert "classifier/kernel" in changed and "pooler/dense/kernel" in changed
    assert "encoder/layers/1/up/kernel" in changed
    assert not any(p.startswith(("encoder/layers/0/", "embeddings/")) for p in changed)
    assert result.traces == 2  # one compile per freeze phase, not per step
    assert set(result.eval_metrics) == {
        "eval_loss",
        "eval_accuracy",
        "eval_macro_f1",
        "eval_examples",
        "eval_confusion",
    }
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    run = restore_run(tmp_path / "run")
    params, meta, step = run.params, run.meta, run.step
    assert step == 3 and meta["label_names"] == ["neg", "pos"]
    restored = _flat(params)
    for p, v in after.items():
        np.testing.assert_array_equal(restored[p], v, err_msg=p)


def test_token_classification_trains_and_predicts_per_word(tmp_path, tiny_bert, data_dir):
    from jaxft.predict import predict_file

    rows = [
        {"words": ["alice", "visited", "paris", "today"], "tags": ["PER", "O", "LOC", "O"]},
        {"words": ["bob", "likes", "berlin"], "tags": ["PER", "O", "LOC"]},
    ] * 8
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(
        model=ModelConfig(source=str(tiny_bert), task="token-classification"),
        load=LoadConfig(new_params=(r"classifier/.*",), ignore_unused=(r"bert\.pooler\..*", r"classifier\..*")),
        mesh=MeshConfig(data=8),
        train=TrainConfig(max_steps=2, batch_size=8, eval_every_steps=0, eval_batch_size=8),
        data=DataConfig(
            dataset="files",
            train_files=(str(path),),
            eval_files=(str(path),),
            text_column="words",
            label_column="tags",
            max_length=16,
        ),
        checkpoint=CheckpointConfig(every_steps=0),
    )
    result = train(cfg, tmp_path / "run")
    assert result.label_names == ("LOC", "O", "PER")
    # `jaxft eval` of the saved step recomputes the training-time eval: accuracy is a count over labelled words.
    record, _ = eval_run(tmp_path / "run", 2)
    assert record["eval_accuracy"] == pytest.approx(result.eval_metrics["eval_accuracy"], rel=1e-6)
    correct = record["eval_accuracy"] * record["eval_examples"]
    assert record["eval_examples"] > 0 and abs(correct - round(correct)) < 1e-6, record
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "carol visited rome"}\n')
    predict_file(tmp_path / "run", inp, tmp_path / "out.jsonl", batch_size=8)
    out = json.loads((tmp_path / "out.jsonl").read_text())
    assert len(out["labels"]) == 3 and set(out["labels"]) <= {"LOC", "O", "PER"}
    assert len(out["probs"]) == 3 and abs(sum(out["probs"][0]) - 1) < 1e-5
