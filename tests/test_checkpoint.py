"""checkpoint.py at unit level: metadata checks, the inspection of a run's checkpoints (complete, damaged, moved
aside), bitwise save/restore of a real tiny state into its shardings, frozen parameters left out of a save, and
the parameter-tree check. Retention is tests/test_checkpoint_retention.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft import checkpoint, models, run_dir
from jaxft.checkpoint import CheckpointSaveError, CorruptCheckpointError, RunCheckpointError
from jaxft.config import CheckpointConfig
from jaxft.sharding import shardings_like
from jaxft.state import TrainState, merge_params, trainable_paths
from tests.fixtures import flat_values, make_setup

GOOD_META = {"config": {}, "spec": {}, "source": {}, "trainable_paths": [], "label_names": []}

# -------------------------------------------------------------------------------------------- metadata


def test_check_metadata_accepts_every_field_of_its_type():
    checkpoint.check_metadata(Path("x"), GOOD_META, "run metadata", RunCheckpointError)
    checkpoint.check_metadata(Path("x"), {**GOOD_META, "extra": 1}, "run metadata", RunCheckpointError)
    with pytest.raises(RunCheckpointError, match=r"^x: corrupted run metadata \(config missing or malformed\)$"):
        checkpoint.check_metadata(Path("x"), {**GOOD_META, "config": None}, "run metadata", RunCheckpointError)


@pytest.mark.parametrize("field", sorted(checkpoint.METADATA_FIELDS))
@pytest.mark.parametrize("how", ["missing", "wrong type"])
def test_check_metadata_names_each_bad_field(field, how):
    meta = {k: v for k, v in GOOD_META.items() if k != field}
    if how == "wrong type":
        meta[field] = "a string"
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.check_metadata(Path("/r/meta"), meta, "checkpoint metadata", CorruptCheckpointError)
    assert str(e.value) == f"/r/meta: corrupted checkpoint metadata ({field} missing or malformed)"


def test_check_metadata_lists_every_bad_field_and_rejects_a_non_dict():
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.check_metadata(Path("m"), {"spec": [], "source": {}, "label_names": {}}, "meta", RunCheckpointError)
    assert str(e.value) == "m: corrupted meta (config, spec, trainable_paths, label_names missing or malformed)"
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.check_metadata(Path("m"), [GOOD_META], "meta", RunCheckpointError)
    assert str(e.value) == "m: corrupted meta (config, spec, source, trainable_paths, label_names missing or malformed)"


def test_error_classes():
    assert issubclass(CorruptCheckpointError, RunCheckpointError)
    assert issubclass(CheckpointSaveError, RunCheckpointError)
    assert issubclass(RunCheckpointError, ValueError)


@pytest.mark.parametrize(
    "metric, mode, want",
    [
        ("eval_loss", "auto", "min"),
        ("eval_perplexity", "auto", "min"),
        ("eval_accuracy", "auto", "max"),
        ("eval_f1", "auto", "max"),
        ("eval_loss", "max", "max"),
        ("eval_accuracy", "min", "min"),
    ],
)
def test_best_mode(metric, mode, want):
    assert checkpoint.best_mode(CheckpointConfig(keep_best_metric=metric, keep_best_mode=mode)) == want


def test_check_same_model():
    spec = models.BertSpec(hidden_size=16, num_layers=1)
    saved = json.loads(json.dumps(dataclasses.asdict(spec)))
    # a new head or dropout is the same model
    checkpoint.check_same_model(Path("p"), "bert", {**saved, "num_labels": 5, "dropout_rate": 0.3}, spec)
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.check_same_model(Path("p"), "bert", {**saved, "hidden_size": 32, "num_layers": 2}, spec)
    assert str(e.value) == "p: checkpoint is from another model (hidden_size 32 vs 16; num_layers 2 vs 1)"
    with pytest.raises(RunCheckpointError, match=r"^p: checkpoint is from another model \(family 'llama' vs 'bert'\)$"):
        checkpoint.check_same_model(Path("p"), "llama", saved, spec)


def test_check_same_model_names_the_decoder_layer_layout():
    spec = models.LlamaSpec(hidden_size=64, num_layers=2, scan_layers=True)
    saved = {**json.loads(json.dumps(dataclasses.asdict(spec))), "scan_layers": False}
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.check_same_model(Path("p"), "llama", saved, spec)
    assert str(e.value) == (
        "p: checkpoint layout is per-layer (model.scan_layers=false) but the config asks for scanned "
        "(model.scan_layers=true)"
    )


# --------------------------------------------------------------------------------- tiny hand-made states


def tiny_state(step: int, frozen: bool = False, width: int = 4) -> TrainState:
    rng = np.random.default_rng(step)
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        trainable=nnx.State({"w": nnx.Param(jnp.asarray(rng.standard_normal(width), jnp.float32))}),
        frozen=nnx.State({"f": nnx.Param(jnp.arange(3.0) + step)} if frozen else {}),
        opt_state=(jnp.asarray(rng.standard_normal(width), jnp.float32),),
        rng=jnp.asarray([step, 7], jnp.uint32),
    )


def abstract(state: TrainState) -> tuple[TrainState, TrainState]:
    """(the abstract state, its shardings): a restore target like setup.abstract_state's."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return shapes, jax.tree.map(lambda x: x.sharding, state)


def save(run: Path, states, cfg: CheckpointConfig | None = None, meta=None, metrics=None) -> None:
    saver = checkpoint.Saver(run, cfg or CheckpointConfig(keep_best_metric="", async_save=False))
    for s in states:
        saver.save(s, {"process_states": [{"step": int(s.step)}]}, meta or GOOD_META, metrics)
        saver.finish()
    saver.close()


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("three")
    (run / "run.json").write_text(json.dumps(GOOD_META))
    save(run, [tiny_state(s) for s in (1, 2, 3)])
    return run


@pytest.fixture
def run(three_steps, tmp_path) -> Path:
    shutil.copytree(three_steps, tmp_path / "run")
    return tmp_path / "run"


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise(a, b) -> None:
    left, right = host(a), host(b)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_tiny_state_round_trips_bitwise(run):
    for step in (1, 3):
        want = tiny_state(step)
        restored = checkpoint.restore_checkpoint(run, *abstract(want), step)
        assert_bitwise(restored, want)
    assert checkpoint.read_data_state(run, 2) == {"process_states": [{"step": 2}]}
    assert checkpoint.read_meta(run, 2) == {**GOOD_META, checkpoint.FROZEN_SAVED: True}


def test_steps_newest_first_and_only_committed_ones_complete(run):
    (checkpoint.checkpoint_dir(run) / "3" / checkpoint.COMMIT_MARKER).unlink()
    (checkpoint.checkpoint_dir(run) / "17.orbax-checkpoint-tmp").mkdir()  # not a step dir
    assert checkpoint.all_steps(run) == [3, 2, 1]
    assert checkpoint.complete_steps(run) == [2, 1]
    assert checkpoint.select_step(run) == 2
    assert checkpoint.all_steps(run / "elsewhere") == [] and checkpoint.complete_steps(run / "elsewhere") == []


def test_check_step_complete(run):
    assert checkpoint.check_step_complete(run, 2) == checkpoint.checkpoint_dir(run) / "2"
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.check_step_complete(run, 9)
    assert type(e.value) is RunCheckpointError
    assert str(e.value) == f"{checkpoint.checkpoint_dir(run) / '9'}: no checkpoint for step 9 (saved steps: 3, 2, 1)"
    (checkpoint.checkpoint_dir(run) / "2" / "state" / checkpoint.COMMIT_MARKER).unlink()
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.check_step_complete(run, 2)
    assert (
        str(e.value)
        == f"{checkpoint.checkpoint_dir(run) / '2' / 'state'}: missing commit marker; the save never finished"
    )


def test_select_step_errors(run, tmp_path):
    with pytest.raises(RunCheckpointError, match=r"not a jaxft run dir \(no run\.json\)$"):
        checkpoint.select_step(tmp_path / "nothing")
    assert checkpoint.select_step(run, 1) == 1
    with pytest.raises(RunCheckpointError, match=r"no checkpoint for step 5 \(saved steps: 3, 2, 1\)$"):
        checkpoint.select_step(run, 5)
    (run / "run.json").write_text(json.dumps({"config": {"checkpoint": {"keep_best_metric": ""}}}))
    with pytest.raises(RunCheckpointError, match=r"--best needs checkpoint\.keep_best_metric, which this run left"):
        checkpoint.select_step(run, best=True)
    for s in (1, 2, 3):
        (checkpoint.checkpoint_dir(run) / str(s) / checkpoint.COMMIT_MARKER).unlink()
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.select_step(run)
    assert str(e.value) == f"{checkpoint.checkpoint_dir(run)}: no complete checkpoint in this run dir"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{truncated", "corrupted checkpoint metadata ("),
        (json.dumps({**GOOD_META, "label_names": "neg,pos"}), "corrupted checkpoint metadata (label_names missing"),
    ],
)
def test_read_meta_of_a_damaged_file(run, content, message):
    path = checkpoint.checkpoint_dir(run) / "2" / "meta" / "metadata"
    path.write_text(content)
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.read_meta(run, 2)
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2", "corrupted data iterator state ("),
        ('{"process_states": 3}', "(no iterator state)"),
        ('{"iterator": []}', "(no iterator state)"),
    ],
)
def test_read_data_state_of_a_damaged_file(run, content, message):
    path = checkpoint.checkpoint_dir(run) / "1" / "data" / "metadata"
    path.write_text(content)
    with pytest.raises(CorruptCheckpointError) as e:
        checkpoint.read_data_state(run, 1)
    assert str(e.value).startswith(f"{path}: corrupted data iterator state")
    assert message in str(e.value)


def test_move_aside_keeps_every_copy(run):
    first = checkpoint.move_aside(run, 3)
    assert first == run.absolute() / "damaged_checkpoints" / "3"
    assert (first / "state").is_dir() and checkpoint.all_steps(run) == [2, 1]
    (checkpoint.checkpoint_dir(run) / "3").mkdir()  # the replayed run saves step 3 again, and it is damaged again
    second = checkpoint.move_aside(run, 3)
    assert second == run.absolute() / "damaged_checkpoints" / "3.1"
    assert first.is_dir() and second.is_dir()


def test_unreadable_saved_metrics_are_moved_aside(tmp_path, caplog):
    cfg = CheckpointConfig(keep_best_metric="eval_loss", async_save=False)
    save(tmp_path, [tiny_state(1), tiny_state(2)], cfg, metrics={"eval_loss": 0.5})
    metrics = checkpoint.checkpoint_dir(tmp_path) / "2" / "metrics" / "metrics"
    assert json.loads(metrics.read_text()) == {"eval_loss": 0.5}
    metrics.write_bytes(b"\x00\x01 not json")
    with caplog.at_level(logging.WARNING, logger="jaxft.checkpoint"):
        checkpoint.quarantine_unreadable_metrics(tmp_path)
    assert checkpoint.all_steps(tmp_path) == [1]
    assert (tmp_path / "damaged_checkpoints" / "2" / "metrics" / "metrics").read_bytes() == b"\x00\x01 not json"
    assert "unreadable checkpoint metrics; moved checkpoint to" in caplog.text


def test_restore_into_another_parameter_tree_names_each_difference(run):
    wider = tiny_state(2, width=5)
    extra = tiny_state(2).replace(
        trainable=nnx.State({"w": nnx.Param(jnp.zeros(4)), "v": nnx.Param(jnp.zeros((2, 2)))})
    )
    path = checkpoint.checkpoint_dir(run) / "2" / "state"
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.restore_checkpoint(run, *abstract(wider), 2)
    assert str(e.value) == f"{path}: checkpoint has a different parameter tree (trainable/w: expected (5,), found (4,))"
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.restore_checkpoint(run, *abstract(extra), 2)
    assert str(e.value) == f"{path}: checkpoint has a different parameter tree (missing trainable/v (2, 2))"


def test_a_save_without_frozen_parameters_reads_them_back_through_load_frozen(tmp_path):
    state = tiny_state(4, frozen=True)
    save(tmp_path, [state], CheckpointConfig(keep_best_metric="", async_save=False, save_frozen=False))
    assert checkpoint.read_meta(tmp_path, 4)[checkpoint.FROZEN_SAVED] is False
    target, shardings = abstract(state)
    path = checkpoint.checkpoint_dir(tmp_path) / "4" / "state"
    with pytest.raises(RunCheckpointError) as e:
        checkpoint.restore_checkpoint(tmp_path, target, shardings, 4)
    assert str(e.value) == f"{path}: checkpoint holds no frozen parameters and nothing can reload them"
    calls = []

    def load_frozen(abstract_frozen, meta):
        calls.append((sorted(param_shapes(abstract_frozen)), meta[checkpoint.FROZEN_SAVED]))
        return nnx.State({"f": nnx.Param(jnp.full((3,), 9.0))})

    restored = checkpoint.restore_checkpoint(tmp_path, target, shardings, 4, load_frozen)
    assert calls == [(["f"], False)]
    np.testing.assert_array_equal(restored.frozen["f"].get_value(), np.full((3,), 9.0))
    assert_bitwise(restored.trainable, state.trainable)
    assert_bitwise(restored.opt_state, state.opt_state)


def param_shapes(state: nnx.State) -> dict[str, tuple]:
    return {"/".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------------- a real state


@pytest.fixture(scope="module")
def real(tiny_bert, tmp_path_factory):
    """A tiny BERT's train state with non-zero optimizer statistics and step (placed, not computed: no compile),
    saved once with its run.json."""
    s = make_setup(tiny_bert, mesh_shape=(8, 1, 1))
    rng = np.random.default_rng(0)

    def noise(x):
        value = rng.standard_normal(x.shape).astype(x.dtype) if x.dtype.kind == "f" else np.full(x.shape, 5, x.dtype)
        return jax.device_put(value, x.sharding)

    state = s.state.replace(
        step=jax.device_put(np.int32(7), s.state.step.sharding), opt_state=jax.tree.map(noise, s.state.opt_state)
    )
    meta = run_dir.run_metadata(s.cfg, s.plan, s.skeleton, ("neg", "pos"), set(trainable_paths(state)))
    run = tmp_path_factory.mktemp("real_run")
    run_dir.write_json(run / "run.json", meta)
    saver = checkpoint.Saver(run, CheckpointConfig())  # async, with the default best-by-eval_loss retention
    saver.save(state, {"process_states": [{"epoch": 1}]}, meta, {"eval_loss": 0.25})
    saver.finish()
    saver.close()
    return s, state, meta, run


def test_a_real_state_round_trips_bitwise_into_its_shardings(real):
    s, state, meta, run = real
    assert checkpoint.complete_steps(run) == [7]
    assert checkpoint.read_meta(run, 7) == {**meta, checkpoint.FROZEN_SAVED: True}
    restored = checkpoint.restore_checkpoint(run, s.layout.abstract, s.layout.shardings, 7)
    assert_bitwise(restored, state)
    got = [x.sharding for x in jax.tree.leaves(restored)]
    assert got == jax.tree.leaves(s.layout.shardings)
    assert int(restored.step) == 7


def test_restore_params_reads_the_parameters_only(real):
    s, state, _, run = real
    abstract_params = s.skeleton.abstract_params
    params, meta, step = checkpoint.restore_params(
        run, abstract_params, shardings_like(abstract_params, s.skeleton.param_shardings), spec=s.skeleton.spec
    )
    assert step == 7 and meta["label_names"] == ["neg", "pos"]
    want = flat_values(merge_params(state.trainable, state.frozen))
    got = flat_values(params)
    assert sorted(got) == sorted(want) == sorted(s.skeleton.param_shapes)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    restored = run_dir.restore_run(run)
    assert restored.step == 7 and restored.meta == run_dir.read_run(run)
    for k, v in flat_values(restored.params).items():
        np.testing.assert_array_equal(v, want[k])
