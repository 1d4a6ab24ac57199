"""`jaxft eval`: a checkpoint evaluated after training gives the training-time eval numbers; macro-F1 by hand;
`--best` picks the lowest eval_loss; `data.*` overrides evaluate other files; other overrides and missing
steps are one-line errors.

The trained run here (6 steps, a checkpoint and an eval every 2) is built once per session and shared with
test_checkpoint_damage.py; tests that write into a run dir work on copies of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxft import cli
from jaxft.evaluate import summarize
from tests.fixtures import one_line_error, shared_run, snapshot, write_rows


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_bert, data_dir) -> dict:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run(shared, tmp_path_factory) -> Path:
    """This module's copy of the shared run (eval writes eval-<step>.json into it)."""
    return Path(shutil.copytree(shared["run"], tmp_path_factory.mktemp("eval") / "run"))


def training_evals(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


# ---------------------------------------------------------------------------------------------------- tests


def test_eval_of_a_step_matches_the_training_time_eval(run, shared, capsys):
    assert cli.main(["eval", str(run), "--step", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads((run / "eval-4.json").read_text())
    assert set(record) == {
        "step",
        "dataset",
        "split",
        "eval_loss",
        "eval_accuracy",
        "eval_macro_f1",
        "eval_examples",
        "eval_confusion",
    }
    assert record["step"] == 4 and record["dataset"] == "files" and record["split"] == "test"
    expected = training_evals(run)[4]
    assert abs(record["eval_loss"] - expected["eval_loss"]) < 1e-5
    assert abs(record["eval_accuracy"] - expected["eval_accuracy"]) < 1e-5
    assert abs(record["eval_macro_f1"] - expected["eval_macro_f1"]) < 1e-5
    assert record["eval_confusion"] == expected["eval_confusion"]
    assert 0.0 <= record["eval_macro_f1"] <= 1.0
    assert record["eval_examples"] == 16  # the rows of eval.jsonl, padding excluded
    assert out[0] == (
        f"step 4: eval_loss={record['eval_loss']:.4f} eval_accuracy={record['eval_accuracy']:.4f} "
        f"eval_macro_f1={record['eval_macro_f1']:.4f} (16 examples)"
    )
    assert out[1] == f"wrote {run / 'eval-4.json'}"
    assert not list(run.glob(".eval-4.json.*")), "a temporary file was left behind"


def test_eval_macro_f1_agrees_with_predictions(run, shared, tmp_path):
    """Macro-F1 recomputed from `predict`'s labels for the same rows (another code path to the logits)."""
    from jaxft.evaluate import eval_run
    from jaxft.predict import predict_file

    record, _ = eval_run(run, 6)
    out = tmp_path / "pred.jsonl"
    predict_file(run, shared["eval_file"], out, batch_size=8, step=6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    truth = [json.loads(line)["label"] for line in shared["eval_file"].read_text().splitlines()]
    preds = [r["label"] for r in rows]  # predict overwrites "label" with its own prediction
    f1s = []
    for c in ("neg", "pos"):
        tp = sum(t == c and p == c for t, p in zip(truth, preds))
        n_pred, n_true = preds.count(c), truth.count(c)
        if n_pred + n_true:
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / n_true if n_true else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert record["eval_macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)
    accuracy = sum(t == p for t, p in zip(truth, preds)) / len(truth)
    assert record["eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_summarize_macro_f1_by_hand():
    # class 0: tp 3 of 4 predicted, 5 true; class 1: tp 4 of 5 predicted, 4 true; class 2: only in the
    # labels (never predicted); class 3: only in the predictions; class 4: in neither (left out of the mean).
    totals = {
        "count": np.float64(10),
        "loss_sum": np.float64(6.5),
        "correct": np.float64(7),
        "tp": np.array([3, 4, 0, 0, 0], np.float32),
        "predicted": np.array([4, 5, 0, 1, 0], np.float32),
        "true": np.array([5, 4, 1, 0, 0], np.float32),
    }
    got = summarize(totals)

    def f1(tp, n_pred, n_true):
        p, r = tp / n_pred, tp / n_true
        return 2 * p * r / (p + r)

    macro = (f1(3, 4, 5) + f1(4, 5, 4) + 0.0 + 0.0) / 4  # = (6/9 + 8/9) / 4 = 7/18
    assert macro == pytest.approx(7 / 18)
    assert got["eval_macro_f1"] == pytest.approx(macro, abs=1e-12)
    assert got["eval_loss"] == pytest.approx(0.65) and got["eval_accuracy"] == pytest.approx(0.7)
    assert got["eval_examples"] == 10.0
    # Padding-only classes do not count; with no example at all every number is 0, not NaN.
    empty = summarize({k: np.zeros_like(v) for k, v in totals.items()})
    assert empty == {"eval_loss": 0.0, "eval_accuracy": 0.0, "eval_macro_f1": 0.0, "eval_examples": 0.0}
    perfect = summarize({**totals, "tp": totals["true"], "predicted": totals["true"]})
    assert perfect["eval_macro_f1"] == pytest.approx(1.0)


def _best_by_hand(run_dir: Path) -> int:
    scores = {}
    for d in (run_dir / "checkpoints").iterdir():
        path = d / "metrics" / "metrics"
        if d.name.isdigit() and path.is_file():
            scores[int(d.name)] = json.loads(path.read_text())["eval_loss"]
    return min(scores, key=scores.get)


def test_best_picks_the_lowest_eval_loss(run, tmp_path, capsys):
    from jaxft.checkpoint import select_step

    evals = training_evals(run)
    by_metrics_file = _best_by_hand(run)
    assert by_metrics_file == min(evals, key=lambda s: evals[s]["eval_loss"])  # the two records agree
    for step in (2, 4, 6):
        saved = json.loads((run / "checkpoints" / str(step) / "metrics" / "metrics").read_text())
        assert saved["eval_loss"] == pytest.approx(evals[step]["eval_loss"], abs=1e-6)
    assert select_step(run, best=True) == by_metrics_file
    assert cli.main(["eval", str(run), "--best"]) == 0
    assert capsys.readouterr().out.startswith(f"step {by_metrics_file}: ")
    assert (run / f"eval-{by_metrics_file}.json").is_file()

    # Make a middle checkpoint the best and drop step 2's metrics (a save without an eval): --best follows.
    other = Path(shutil.copytree(run, tmp_path / "run"))
    metrics_4 = other / "checkpoints" / "4" / "metrics" / "metrics"
    metrics_4.write_text(json.dumps({**json.loads(metrics_4.read_text()), "eval_loss": -1.0}))
    shutil.rmtree(other / "checkpoints" / "2" / "metrics")
    assert _best_by_hand(other) == 4
    assert select_step(other, best=True) == 4
    assert cli.main(["eval", str(other), "--best"]) == 0
    assert capsys.readouterr().out.startswith("step 4: ")


def test_data_override_evaluates_another_file(run, shared, tmp_path, capsys):
    other = write_rows(tmp_path / "other.jsonl", 13, start=500)  # not a multiple of the batch of 8
    assert cli.main(["eval", str(run), "--step", "6", f"data.eval_files={other}"]) == 0
    assert "(13 examples)" in capsys.readouterr().out
    record = json.loads((run / "eval-6.json").read_text())
    assert record["eval_examples"] == 13 and record["step"] == 6
    assert 0.0 <= record["eval_accuracy"] <= 1.0 and 0.0 <= record["eval_macro_f1"] <= 1.0


def test_eval_errors_are_one_line(run, capsys):
    before = snapshot(run)
    line = one_line_error(["eval", run, "--step", "6", "optim.learning_rate=1"], capsys)
    assert "'optim.learning_rate=1'" in line and "only data.* overrides" in line
    line = one_line_error(["eval", run, "--step", "999"], capsys)
    assert str(run / "checkpoints" / "999") in line and "no checkpoint for step 999" in line
    assert "saved steps: 6, 4, 2" in line
    line = one_line_error(["eval", run, "--step", "6", "data.nosuchkey=1"], capsys)
    assert "data.nosuchkey" in line
    line = one_line_error(["eval", run.parent / "not_a_run"], capsys)
    assert "not a jaxft run dir" in line
    assert snapshot(run) == before
