"""Early stopping: the patience counter (modes, min_delta, state round trip), the loop stopping after the eval
that runs out of patience (and saving it), config errors, and a CLI run that stops, says so, resumes as complete
and exports its best checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxft import cli
from jaxft.config import Config, ConfigError, TrainConfig, validate
from jaxft.loop import Cadence, EarlyStopping, LoopHooks, NonFinitePolicy, PhaseStep, run_loop
from tests.fixtures import one_line_error, write_config, write_rows


def test_patience_counts_evals_without_improvement_beyond_min_delta():
    es = EarlyStopping("eval_loss", "min", patience=2, min_delta=0.01)
    assert es.observe(2, {"eval_loss": 1.0}) == ""  # the first eval is the best so far
    assert es.observe(4, {"eval_loss": 0.995}) == ""  # better, but not by more than min_delta
    assert es.observe(6, {"eval_loss": 0.5}) == "" and es.bad_evals == 0 and es.best_step == 6
    assert es.observe(8, {"eval_loss": 0.6}) == ""
    reason = es.observe(10, {"eval_loss": 0.5})
    assert reason == "stopped early at step 10: eval_loss did not improve for 2 evals (best 0.5 at step 6)"
    again = EarlyStopping("eval_loss", "min", 2, 0.01, json.loads(json.dumps(es.state())))
    assert again.stopped_at == 10 and again.reason() == reason
    assert EarlyStopping("eval_loss", "min", 3, 0.01, es.state()).stopped_at == 0  # a larger patience goes on


def test_max_mode_and_a_missing_metric():
    es = EarlyStopping("eval_accuracy", "max", patience=1, min_delta=0.0)
    assert es.observe(1, {"eval_accuracy": 0.5}) == "" and es.observe(2, {"eval_accuracy": 0.6}) == ""
    assert es.observe(3, {"eval_accuracy": 0.6}).startswith("stopped early at step 3: eval_accuracy")
    assert EarlyStopping("eval_loss", "min", 0, 0.0).observe(1, {"eval_loss": 1.0}) == ""  # off


def _loop(early: EarlyStopping, max_steps: int = 20):
    events = []

    def run(state, batch):
        return state + 1, {"loss": 1.0}

    hooks = LoopHooks(
        next_batch=lambda: {},
        phase_at=lambda i: "p",
        build_step=lambda phase: PhaseStep(run, ("w",)),
        evaluate=lambda state: events.append(("eval", state)) or {"eval_loss": 1.0 if state > 2 else 2.0},
        save=lambda state, metrics: events.append(("save", state)),
        write_metrics=lambda record: None,
        after_eval=early.observe,
    )
    cadence = Cadence(max_steps, 0, 2, 100, 1, save_at_eval=True)
    return run_loop(0, 0, "p", cadence, hooks, NonFinitePolicy("halt", 10)), events


def test_the_loop_stops_after_the_eval_that_runs_out_of_patience_and_saves_every_eval():
    result, events = _loop(EarlyStopping("eval_loss", "min", patience=2, min_delta=0.0))
    # evals at 2 (2.0), 4 (1.0: best), 6 and 8 (no better): stop at 8
    assert result.stopped_by == "stopped early at step 8: eval_loss did not improve for 2 evals (best 1 at step 4)"
    assert events == [(k, s) for s in (2, 4, 6, 8) for k in ("eval", "save")]
    result, _ = _loop(EarlyStopping("eval_loss", "min", patience=2, min_delta=0.0), max_steps=8)
    assert result.stopped_by == ""  # running out of patience at the last step is just the end of the run


@pytest.mark.parametrize(
    "train, task, message",
    [
        (dict(early_stopping_patience=2, eval_every_steps=0), "sequence-classification", "set train.eval_every_steps"),
        (
            dict(early_stopping_patience=2, early_stopping_metric="eval_perplexity"),
            "sequence-classification",
            "'eval_perplexity' is never computed for model.task='sequence-classification'",
        ),
        (
            dict(early_stopping_patience=2, early_stopping_metric="eval_macro_f1"),
            "causal-lm",
            "'eval_macro_f1' is never computed for model.task='causal-lm'",
        ),
        (dict(early_stopping_patience=-1), "sequence-classification", "must be >= 0"),
    ],
)
def test_bad_early_stopping_configs(train, task, message):
    cfg = Config(train=TrainConfig(**train))
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, task=task))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_run_stops_early_resumes_as_complete_and_exports_its_best(tiny_bert, tmp_path, capsys, data_dir):
    rows = write_rows(tmp_path / "rows.jsonl", 32)
    config = write_config(
        tmp_path / "c.py",
        tiny_bert,
        rows,
        train={"max_steps": 40, "eval_every_steps": 2, "early_stopping_patience": 2},
        optim={"learning_rate": 0.0, "warmup_steps": 0},  # every eval the same: none improves on the first
        checkpoint={"every_steps": 100, "keep": 1},
    )
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stopped early at step 6: eval_loss did not improve for 2 evals (best " in out and "at step 2)" in out
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and len(steps) <= 2  # the latest, and a best (every eval saved; here all evals tie)
    data = json.loads((run_dir / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert data["early_stopping"]["stopped_at"] == 6 and data["early_stopping"]["best_step"] == 2
    assert cli.main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    assert "stopped early at step 6" in capsys.readouterr().out
    assert max(r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())) == 6
    assert cli.main(["export", str(run_dir), str(tmp_path / "best"), "--best"]) == 0
    exported = int(capsys.readouterr().out.split("exported step ")[1].split()[0])
    assert exported in steps


def test_early_stopping_without_an_eval_split_is_one_line(tiny_bert, tmp_path, capsys, data_dir):
    rows = write_rows(tmp_path / "rows.jsonl", 16)
    config = write_config(tmp_path / "c.py", tiny_bert, rows, train={"early_stopping_patience": 2})
    line = one_line_error(["train", config, "--run-dir", tmp_path / "run", "data.eval_files=[]"], capsys)
    assert "train.early_stopping_patience: eval_loss is never computed: the data has no eval split" in line
    assert not (tmp_path / "run").exists()
