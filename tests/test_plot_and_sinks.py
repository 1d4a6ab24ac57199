"""`jaxft plot` (PNGs of a run from its metrics alone, the confusion matrix from the eval's counts) and the
metrics sinks of train.report_to: Weights & Biases offline (nothing sent), resumed as the same W&B run; a missing
extra and an unknown sink are one line."""

import json
import sys

import numpy as np
import pytest

from jaxft import cli
from tests.fixtures import metrics_records, one_line_error, write_config, write_rows


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("plot")
    rows = write_rows(tmp / "rows.jsonl", 32)
    config = write_config(
        tmp / "c.py",
        tiny_bert,
        rows,
        train={"max_steps": 6, "eval_every_steps": 2},
        optim={"learning_rate": 1e-2, "warmup_steps": 2},
    )
    assert cli.main(["train", str(config), "--run-dir", str(tmp / "run")]) == 0
    return tmp / "run"


def test_evals_record_the_confusion_counts(run):
    evals = [r for r in metrics_records(run) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        counts = np.asarray(r["eval_confusion"])
        assert counts.shape == (2, 2) and counts.sum() == r["eval_examples"] == 32
        assert np.trace(counts) == round(r["eval_accuracy"] * 32)


def test_plot_writes_the_training_eval_and_confusion_pictures(run, capsys):
    from PIL import Image

    assert cli.main(["plot", str(run)]) == 0
    written = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()]
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert names == ["confusion.png", "eval.png", "training.png"]
    for path in written:
        image = Image.open(path)
        assert image.format == "PNG" and image.size[0] >= 400
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5  # something is drawn
    assert cli.main(["plot", str(run), "--best"]) == 0
    assert not list((run / "plots").glob(".*"))  # no temporary file left


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert "not a jaxft run dir" in one_line_error(["plot", tmp_path], capsys)


def test_wandb_offline_logs_and_a_resume_continues_the_same_run(tiny_bert, tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = write_rows(tmp_path / "rows.jsonl", 16)
    config = write_config(
        tmp_path / "c.py",
        tiny_bert,
        rows,
        train={"max_steps": 2, "eval_every_steps": 0, "report_to": ("jsonl", "wandb"), "wandb_project": "p"},
    )
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    argv = ["train", str(config), "--run-dir", str(run_dir), "train.max_steps=4", "--allow-config-change"]
    assert cli.main(argv) == 0
    assert json.loads((run_dir / "wandb.json").read_text())["id"] == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)  # one W&B run, resumed
    assert all(list(p.glob("*.wandb")) for p in runs)
    assert not (run_dir / "tensorboard").exists()  # only the sinks asked for


def test_a_missing_wandb_extra_and_an_unknown_sink_are_one_line(tiny_bert, tmp_path, monkeypatch, capsys, data_dir):
    rows = write_rows(tmp_path / "rows.jsonl", 16)
    config = write_config(tmp_path / "c.py", tiny_bert, rows)
    line = one_line_error(["train", config, "--run-dir", tmp_path / "a", "train.report_to=jsonl,mlflow"], capsys)
    assert "train.report_to: unknown sink 'mlflow' (known: jsonl, tensorboard, wandb)" in line
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    line = one_line_error(["train", config, "--run-dir", tmp_path / "b", "train.report_to=jsonl,wandb"], capsys)
    assert "pip install 'jaxft[wandb]'" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
