"""run_dir.py: run.json (atomic write, metadata, checked read), the config-change check of a resume, the scan for
the checkpoint a run resumes from (with a fake restore, over tiny real checkpoints), and restore_run's errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxft import checkpoint, models, run_dir, setup
from jaxft import mesh as mesh_lib
from jaxft.checkpoint import CorruptCheckpointError, RunCheckpointError
from jaxft.config import CheckpointConfig, Config, ConfigError, MeshConfig, to_json
from jaxft.state import TrainState

SPEC = models.BertSpec(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=16)


@pytest.fixture(scope="module")
def skeleton() -> setup.ModelSkeleton:
    cfg = Config()
    return setup.skeleton_of(SPEC, cfg, mesh_lib.build_mesh(cfg.mesh))


@pytest.fixture(scope="module")
def meta(skeleton) -> dict:
    cfg = Config()
    plan = setup.build_freeze_plan(skeleton, cfg)
    return run_dir.run_metadata(cfg, plan, skeleton, ("neg", "pos"), {"pooler/dense/kernel", "classifier/bias"})


# ------------------------------------------------------------------------------------------- write_json


def test_write_json_writes_the_object_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    run_dir.write_json(path, {"a": [1, 2], "b": {"c": "d"}})
    run_dir.write_json(path, {"a": [3]})  # replaces the earlier one
    assert json.loads(path.read_text()) == {"a": [3]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_write_json_that_fails_keeps_the_existing_file(tmp_path):
    path = tmp_path / "run.json"
    run_dir.write_json(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not JSON serializable"):
        run_dir.write_json(path, {"step": 2, "bad": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_write_json_interrupted_mid_write_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    run_dir.write_json(path, {"step": 1})
    before = path.read_bytes()

    def disk_full(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:5])  # part of it reaches the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        run_dir.write_json(path, {"step": 2, "more": list(range(100))})
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------------------- run metadata


def test_run_metadata_records_what_a_run_dir_needs(meta, skeleton):
    keys = ["config", "family", "freeze_plan", "hf_config", "label_names", "source", "spec", "trainable_paths"]
    assert sorted(meta) == keys
    assert meta["config"] == to_json(Config())
    assert meta["trainable_paths"] == ["classifier/bias", "pooler/dense/kernel"]  # sorted
    assert meta["label_names"] == ["neg", "pos"]
    assert meta["family"] == "bert"
    assert meta["spec"] == dataclasses.asdict(SPEC)
    assert meta["freeze_plan"]["rules"] == [[".*", "train"]]
    assert sorted(meta["freeze_plan"]["params"]) == sorted(skeleton.param_shapes)
    assert json.loads(json.dumps(meta)) == meta  # plain JSON already: what read_run gives back


def test_run_metadata_adds_prompt_kind_only_when_given(skeleton):
    cfg = Config()
    plan = setup.build_freeze_plan(skeleton, cfg)
    with_kind = run_dir.run_metadata(cfg, plan, skeleton, (), set(), prompt_kind="chat")
    assert with_kind["prompt_kind"] == "chat"
    assert "prompt_kind" not in run_dir.run_metadata(cfg, plan, skeleton, (), set())


def test_read_run_returns_what_was_written(tmp_path, meta):
    run_dir.write_json(tmp_path / "run.json", meta)
    assert run_dir.read_run(tmp_path) == meta


def test_read_run_of_a_folder_without_run_json(tmp_path):
    with pytest.raises(RunCheckpointError) as e:
        run_dir.read_run(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a jaxft run dir (no run.json)"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage"])
def test_read_run_of_a_corrupted_run_json(tmp_path, content):
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(RunCheckpointError, match=r"run\.json: corrupted run metadata \("):
        run_dir.read_run(tmp_path)


@pytest.mark.parametrize("field", ["config", "spec", "source", "trainable_paths", "label_names"])
def test_read_run_names_a_missing_field(tmp_path, meta, field):
    run_dir.write_json(tmp_path / "run.json", {k: v for k, v in meta.items() if k != field})
    with pytest.raises(RunCheckpointError) as e:
        run_dir.read_run(tmp_path)
    assert str(e.value) == f"{tmp_path / 'run.json'}: corrupted run metadata ({field} missing or malformed)"


# ------------------------------------------------------------------------------------- config changes


def test_check_config_change_accepts_the_same_config_and_resumable_changes(tmp_path, caplog):
    saved = to_json(Config())
    with caplog.at_level(logging.WARNING, logger="jaxft.run_dir"):
        run_dir.check_config_change(tmp_path, saved, Config(), allow=False)
        changed = Config().derive(train={"log_every_steps": 3}, checkpoint={"keep": 9})
        run_dir.check_config_change(tmp_path, saved, changed, allow=False)
    assert caplog.records == []


def test_check_config_change_refuses_a_change_of_the_math(tmp_path):
    cfg = Config().derive(optim={"learning_rate": 1e-3}, train={"seed": 3, "log_every_steps": 7})
    with pytest.raises(ConfigError) as e:
        run_dir.check_config_change(tmp_path / "ckpt", to_json(Config()), cfg, allow=False)
    assert str(e.value) == (
        f"{tmp_path / 'ckpt'}: config differs from the checkpoint's in keys that change the result: "
        "optim.learning_rate (5e-05 -> 0.001), train.seed (0 -> 3); pass --allow-config-change to resume anyway"
    )


def test_compute_dtype_auto_resumes_a_run_saved_with_the_dtype_it_means_here(tmp_path):
    """A run saved before model.compute_dtype defaulted to "auto" recorded "float32"; on CPU devices "auto" is
    float32, so it resumes; against "bfloat16" it is a change of the math."""
    from jaxft.config import MeshConfig
    from jaxft.mesh import build_mesh

    mesh = build_mesh(MeshConfig())
    saved = to_json(Config().derive(model={"compute_dtype": "float32"}))
    run_dir.check_config_change(tmp_path, saved, Config(), allow=False, mesh=mesh)
    with pytest.raises(ConfigError, match=r"model.compute_dtype \('float32' -> 'auto'\)"):
        run_dir.check_config_change(tmp_path, saved, Config(), allow=False)  # no mesh: not resolved
    bf16 = to_json(Config().derive(model={"compute_dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match=r"model.compute_dtype \('bfloat16' -> 'auto'\)"):
        run_dir.check_config_change(tmp_path, bf16, Config(), allow=False, mesh=mesh)


def test_check_config_change_allowed_warns(tmp_path, caplog):
    cfg = Config().derive(optim={"learning_rate": 1e-3})
    with caplog.at_level(logging.WARNING, logger="jaxft.run_dir"):
        run_dir.check_config_change(tmp_path, to_json(Config()), cfg, allow=True)
    assert "resuming with a changed config (--allow-config-change): optim.learning_rate (5e-05 -> 0.001)" in (
        caplog.text
    )


# ------------------------------------------------------------------------------------- resume point


class FakeRestore:
    """Stands in for train's restore: records (step, meta) and returns a marker, or raises for `bad` steps."""

    def __init__(self, bad=()):
        self.calls, self.bad = [], set(bad)

    def __call__(self, step, meta):
        self.calls.append((step, meta))
        if step in self.bad:
            raise CorruptCheckpointError(f"step {step}: unreadable array data (test)")
        return ("restored", step)


def test_no_resume_point_in_a_missing_or_empty_run_dir(tmp_path, skeleton):
    restore = FakeRestore()
    missing = tmp_path / "nothing here"
    assert run_dir.find_resume_point(missing, Config(), skeleton, restore, False) is None
    assert not missing.exists()  # looking creates nothing
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert run_dir.find_resume_point(tmp_path / "empty", Config(), skeleton, restore, False) is None
    assert restore.calls == []


def _tiny_state(step: int) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        trainable=nnx.State({"w": nnx.Param(jnp.full((4,), float(step)))}),
        frozen=nnx.State({}),
        opt_state=(),
        rng=jnp.zeros((2,), jnp.uint32),
    )


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, meta) -> Path:
    """A run dir with complete checkpoints of steps 1 and 2 (tiny states; the restore is faked)."""
    d = tmp_path_factory.mktemp("saved_run")
    saver = checkpoint.Saver(d, CheckpointConfig(keep_best_metric="", async_save=False))
    for step in (1, 2):
        saver.save(_tiny_state(step), {"process_states": [{"position": step}], "skipped_steps": step - 1}, meta)
        saver.finish()
    saver.close()
    return d


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def test_resumes_from_the_newest_checkpoint(run, skeleton, meta):
    restore = FakeRestore()
    point = run_dir.find_resume_point(run, Config(), skeleton, restore, False)
    assert point == run_dir.ResumePoint(
        step=2,
        state=("restored", 2),
        trainable_paths=frozenset({"classifier/bias", "pooler/dense/kernel"}),
        data={"process_states": [{"position": 2}], "skipped_steps": 1},
    )
    assert restore.calls == [(2, {**meta, checkpoint.FROZEN_SAVED: True})]
    assert run_dir.data_iterator_state(point.data) == {"position": 2}
    assert not (run / "damaged_checkpoints").exists()


def _unfinish(run: Path, step: int) -> None:
    (checkpoint.checkpoint_dir(run) / str(step) / "data" / checkpoint.COMMIT_MARKER).unlink()


def _corrupt_data_state(run: Path, step: int) -> None:
    (checkpoint.checkpoint_dir(run) / str(step) / "data" / "metadata").write_text('{"no": "states"}')


@pytest.mark.parametrize("damage", [_unfinish, _corrupt_data_state, "restore fails"])
def test_a_damaged_newest_checkpoint_is_skipped_and_moved_aside(run, skeleton, damage, caplog):
    restore = FakeRestore(bad={2} if damage == "restore fails" else ())
    if callable(damage):
        damage(run, 2)
    with caplog.at_level(logging.WARNING):
        point = run_dir.find_resume_point(run, Config(), skeleton, restore, False)
    assert point.step == 1 and point.state == ("restored", 1)
    assert point.data == {"process_states": [{"position": 1}], "skipped_steps": 0}
    assert checkpoint.all_steps(run) == [1]
    assert (run / "damaged_checkpoints" / "2" / "meta" / "metadata").is_file()  # kept, not deleted
    assert "skipping damaged checkpoint: " in caplog.text
    assert f"moved damaged checkpoint 2 to {run.absolute() / 'damaged_checkpoints' / '2'}" in caplog.text


def test_no_usable_checkpoint_is_an_error_naming_each_and_moves_nothing(run, skeleton):
    _unfinish(run, 2)
    restore = FakeRestore(bad={1})
    with pytest.raises(RunCheckpointError) as e:
        run_dir.find_resume_point(run, Config(), skeleton, restore, False)
    assert type(e.value) is RunCheckpointError  # not a damaged-checkpoint error a caller would skip
    ckpts = checkpoint.checkpoint_dir(run)
    assert str(e.value) == (
        f"{ckpts}: no usable checkpoint ({ckpts / '2' / 'data'}: missing commit marker; the save never finished; "
        "step 1: unreadable array data (test))"
    )
    assert checkpoint.all_steps(run) == [2, 1] and not (run / "damaged_checkpoints").exists()


def test_a_config_that_changes_the_math_is_an_error_not_a_skip(run, skeleton):
    cfg = Config().derive(optim={"learning_rate": 1e-3})
    restore = FakeRestore()
    with pytest.raises(ConfigError, match=r"checkpoints/2: config differs .*optim\.learning_rate \(5e-05 -> 0\.001\)"):
        run_dir.find_resume_point(run, cfg, skeleton, restore, False)
    assert restore.calls == [] and checkpoint.all_steps(run) == [2, 1]
    assert run_dir.find_resume_point(run, cfg, skeleton, restore, True).step == 2


def test_a_checkpoint_of_another_model_is_an_error_not_a_skip(run):
    cfg = Config()
    other = setup.skeleton_of(dataclasses.replace(SPEC, hidden_size=32), cfg, mesh_lib.build_mesh(cfg.mesh))
    with pytest.raises(RunCheckpointError) as e:
        run_dir.find_resume_point(run, cfg, other, FakeRestore(), False)
    assert str(e.value) == (
        f"{checkpoint.checkpoint_dir(run) / '2'}: checkpoint is from another model (hidden_size 16 vs 32)"
    )


def test_the_data_iterator_state_is_global_and_older_per_process_ones_still_read():
    assert run_dir.data_iterator_state({"iterator": {"p": 5}}) == {"p": 5}
    assert run_dir.data_iterator_state({"process_states": [{"p": 0}]}) == {"p": 0}
    assert run_dir.data_iterator_state({"process_states": [{"p": 0}, {"p": 1}]}) == {"p": 0}


# ---------------------------------------------------------------------------------------------- restore


def test_restore_run_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunCheckpointError) as e:
        run_dir.restore_run(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a jaxft run dir (no run.json)"


def test_restore_run_of_a_run_without_checkpoints(tmp_path, meta):
    run_dir.write_json(tmp_path / "run.json", meta)
    with pytest.raises(RunCheckpointError) as e:
        run_dir.restore_run(tmp_path)
    assert str(e.value) == f"{checkpoint.checkpoint_dir(tmp_path)}: no complete checkpoint in this run dir"


def test_restore_mesh_falls_back_to_data_parallel_on_another_device_count():
    cfg = Config().derive(mesh={"data": 4, "fsdp": 4})  # 16 devices; this host has 8
    assert dict(run_dir.restore_mesh(cfg).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    fits = Config().replace(mesh=MeshConfig(data=2, fsdp=4))
    assert dict(run_dir.restore_mesh(fits).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
