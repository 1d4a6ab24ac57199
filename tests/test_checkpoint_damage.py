"""Damaged and foreign checkpoints: `jaxft eval` names the path and the problem in one line (exit 2) and
touches nothing; `jaxft train` skips damaged checkpoints on resume, moves them aside and ends bitwise equal
to the undamaged run; a checkpoint of another model or parameter tree is an error, never a fallback.

The trained run (steps 2, 4, 6) is shared with test_eval.py; every test damages its own copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import one_line_error, run_cli, run_params, save_tiny_bert, shared_run, snapshot


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_bert, data_dir) -> dict:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_params(shared) -> dict[str, np.ndarray]:
    return run_params(shared["run"], 6)


@pytest.fixture
def run(shared, tmp_path) -> Path:
    """A fresh copy of the shared run, to damage."""
    return Path(shutil.copytree(shared["run"], tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ damage


def truncate_array_file(run_dir: Path, step: int) -> Path:
    """Cuts the largest array data file of a step (the embedding table's chunk) to half its size."""
    files = [
        p for p in (run_dir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]
    biggest = max(files, key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    biggest.write_bytes(data[: len(data) // 2])
    return biggest


def remove_commit_marker(run_dir: Path, step: int) -> Path:
    marker = run_dir / "checkpoints" / str(step) / "commit_success.txt"
    marker.unlink()
    return marker


def remove_item_commit_marker(run_dir: Path, step: int) -> Path:
    marker = run_dir / "checkpoints" / str(step) / "meta" / "commit_success.txt"
    marker.unlink()
    return marker


def truncate_tree_file(run_dir: Path, step: int) -> Path:
    """Cuts the OCDBT b-tree file at state/d/ (the index of every array and its small values) in half."""
    (tree,) = (run_dir / "checkpoints" / str(step) / "state" / "d").iterdir()
    data = tree.read_bytes()
    tree.write_bytes(data[: len(data) // 2])
    return tree


def corrupt_metadata(run_dir: Path, step: int) -> Path:
    meta = run_dir / "checkpoints" / str(step) / "meta" / "metadata"
    meta.write_bytes(b"\x00\xff\xfe garbage {{{ not json" * 3)
    return meta


DAMAGE = {
    "truncated_array": (truncate_array_file, "state: unreadable array data"),
    "missing_commit_marker": (remove_commit_marker, "checkpoints/{step}: missing commit marker"),
    "corrupted_metadata": (corrupt_metadata, "meta/metadata: corrupted checkpoint metadata"),
    "missing_item_commit_marker": (remove_item_commit_marker, "checkpoints/{step}/meta: missing commit marker"),
    "truncated_tree": (truncate_tree_file, "state: unreadable array metadata"),
}


# ------------------------------------------------------------------------------- checkpoints of other models


def foreign_checkpoint(shared: dict, out: Path, overrides: list[str], num_labels: int) -> Path:
    """A step dir as jaxft saves it, of the shared config with `overrides` (another model or head), holding
    the freshly loaded state: built with the run's own save path, without compiling a train step."""
    from jaxft import checkpoint
    from jaxft.config import load_config
    from jaxft.run_dir import run_metadata
    from jaxft.setup import build_train_setup

    cfg = load_config(shared["config"], overrides)
    s = build_train_setup(cfg, num_labels)
    state, active = s.state, s.layout.trainable_paths
    meta = run_metadata(cfg, s.plan, s.skeleton, tuple(cfg.data.label_names or ("neg", "pos")), active)
    saver = checkpoint.Saver(out, cfg.checkpoint)
    try:
        saver.save(state, {"process_states": [{}], "skipped_steps": 0}, meta)
        saver.finish()
    finally:
        saver.close()
    return out / "checkpoints" / "0"


@pytest.fixture(scope="module")
def roberta_step(shared, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("roberta")
    model = save_tiny_bert(tmp / "model", family="roberta")
    return foreign_checkpoint(shared, tmp / "run", [f"model.source={model}"], 2)


@pytest.fixture(scope="module")
def three_label_step(shared, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("three_labels")
    return foreign_checkpoint(shared, tmp / "run", ["data.label_names=neg,neutral,pos"], 3)


# ---------------------------------------------------------------------------------- eval of a bad checkpoint


@pytest.mark.parametrize(
    "damage", ["missing_commit_marker", "missing_item_commit_marker", "corrupted_metadata", "truncated_tree"]
)
def test_eval_of_a_damaged_checkpoint_is_one_line(run, damage, capsys):
    make, problem = DAMAGE[damage]
    make(run, 4)
    before = snapshot(run)
    line = one_line_error(["eval", run, "--step", "4"], capsys)
    assert str(run / "checkpoints" / "4") in line and problem.format(step=4) in line, line
    assert snapshot(run) == before


def test_eval_of_a_truncated_array_file_in_a_real_process(run, shared):
    truncate_array_file(run, 6)
    before = snapshot(run)
    r = run_cli("eval", run, "--step", "6", env=shared["env"])
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"jaxft: error: {run / 'checkpoints' / '6' / 'state'}: unreadable array data")
    assert r.stdout == ""
    assert snapshot(run) == before


def test_predict_of_a_truncated_array_file(run, shared, capsys):
    """predict reads checkpoints the same way; here from the default (latest) step."""
    truncate_array_file(run, 6)
    before = snapshot(run)
    out = run.parent / "p.jsonl"
    line = one_line_error(["predict", run, "--input", shared["eval_file"], "--output", out], capsys)
    assert f"{run / 'checkpoints' / '6' / 'state'}: unreadable array data" in line, line
    assert snapshot(run) == before and not out.exists()


def test_eval_of_a_checkpoint_of_another_model(run, roberta_step, capsys):
    shutil.copytree(roberta_step, run / "checkpoints" / "8")
    before = snapshot(run)
    line = one_line_error(["eval", run, "--step", "8"], capsys)
    assert f"{run / 'checkpoints' / '8'}: checkpoint is from another model (" in line, line
    assert "family 'roberta' vs 'bert'" in line, line
    assert snapshot(run) == before


def test_eval_of_a_checkpoint_with_another_head(run, three_label_step, capsys):
    shutil.copytree(three_label_step, run / "checkpoints" / "8")
    before = snapshot(run)
    line = one_line_error(["eval", run, "--step", "8"], capsys)
    assert f"{run / 'checkpoints' / '8' / 'state'}: checkpoint has a different parameter tree (" in line, line
    assert "classifier/kernel: expected (32, 2), found (32, 3)" in line, line
    assert "classifier/bias: expected (2,), found (3,)" in line, line
    assert "encoder" not in line  # only the mis-shaped paths are listed
    assert snapshot(run) == before


# ------------------------------------------------------------------------- resume onto a foreign checkpoint


def test_resume_onto_a_checkpoint_of_another_model_is_an_error_not_a_fallback(run, shared, roberta_step, capsys):
    shutil.copytree(roberta_step, run / "checkpoints" / "8")
    before = snapshot(run)
    train = ["train", shared["config"], "--run-dir", run]
    # The architecture is checked before the config, so the message says what is really wrong, and
    # --allow-config-change does not get past it.
    for extra in ([], ["--allow-config-change"]):
        line = one_line_error([*train, *extra], capsys)
        assert f"{run / 'checkpoints' / '8'}: checkpoint is from another model (family 'roberta' vs 'bert'" in line
    assert snapshot(run) == before and not (run / "damaged_checkpoints").exists()


def test_resume_after_the_pretrained_folder_was_replaced_by_another_model(run, shared, capsys):
    """Same config, but model.source now holds a RoBERTa: the newest checkpoint is from another model."""
    model = shared["model"]
    kept = model.with_name("model.orig")
    model.rename(kept)
    try:
        save_tiny_bert(model, family="roberta")
        before = snapshot(run)
        line = one_line_error(["train", shared["config"], "--run-dir", run], capsys)
    finally:
        shutil.rmtree(model, ignore_errors=True)
        kept.rename(model)
    assert f"{run / 'checkpoints' / '6'}: checkpoint is from another model (family 'bert' vs 'roberta'" in line
    assert snapshot(run) == before


def test_resume_onto_a_checkpoint_with_another_head_is_an_error(run, shared, three_label_step, capsys):
    shutil.copytree(three_label_step, run / "checkpoints" / "8")
    before = snapshot(run)
    line = one_line_error(["train", shared["config"], "--run-dir", run, "--allow-config-change"], capsys)
    assert "checkpoint has a different parameter tree (" in line and "classifier/kernel" in line, line
    assert snapshot(run) == before and not (run / "damaged_checkpoints").exists()


# ------------------------------------------------------------------------------------------ resume fallback


# Which step gets which damage. The first is the plain case (the newest checkpoint is bad, the one before it
# serves); the second skips two in one resume. Together: a truncated array file, an unfinished save (no
# commit marker) and corrupted run metadata.
RESUME_CASES = {
    "newest_truncated": {6: "truncated_array"},
    "two_newest_unfinished_and_corrupted": {6: "missing_commit_marker", 4: "corrupted_metadata"},
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_skips_damaged_checkpoints_and_ends_as_the_undamaged_run(run, shared, reference_params, case):
    damage = RESUME_CASES[case]
    for step, kind in damage.items():
        DAMAGE[kind][0](run, step)
    damaged = {step: snapshot(run / "checkpoints" / str(step)) for step in damage}
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    r = run_cli("train", shared["config"], "--run-dir", run, env=shared["env"])  # the very same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    skipped = [line for line in lines if line.startswith("skipping damaged checkpoint: ")]
    assert len(skipped) == len(damage), r.stderr[-3000:]
    for line, (step, kind) in zip(skipped, sorted(damage.items(), reverse=True)):  # newest first
        assert str(run / "checkpoints" / str(step)) in line and DAMAGE[kind][1].format(step=step) in line, line
        assert f"moved damaged checkpoint {step} to {run / 'damaged_checkpoints' / str(step)}" in lines
    resume_step = min(damage) - 2
    assert f"resuming from {run / 'checkpoints' / str(resume_step)}" in lines, r.stderr[-3000:]

    from jaxft.checkpoint import check_step_complete, complete_steps

    assert complete_steps(run) == [6, 4, 2]
    for step in damage:
        check_step_complete(run, step)  # saved again, complete
        assert snapshot(run / "damaged_checkpoints" / str(step)) == damaged[step]  # kept as it was
    replayed = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert replayed == losses
    got = run_params(run, 6)
    assert got.keys() == reference_params.keys()
    for k, v in reference_params.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_no_usable_checkpoint_is_one_line_and_moves_nothing(run, shared, capsys):
    remove_commit_marker(run, 2)
    corrupt_metadata(run, 4)
    truncate_array_file(run, 6)
    before = snapshot(run)
    line = one_line_error(["train", shared["config"], "--run-dir", run], capsys)
    assert line.startswith(f"jaxft: error: {run / 'checkpoints'}: no usable checkpoint ("), line
    for step, damage in ((2, "missing_commit_marker"), (4, "corrupted_metadata"), (6, "truncated_array")):
        assert DAMAGE[damage][1].format(step=step) in line, line
    assert snapshot(run) == before and not (run / "damaged_checkpoints").exists()
    # Read-only commands see no complete checkpoint except the one with a marker and damaged contents.
    line = one_line_error(["eval", run], capsys)
    assert "checkpoints/6/state: unreadable array data" in line, line
    assert snapshot(run) == before
