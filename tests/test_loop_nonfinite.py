"""The non-finite policy: a NaN step never changes the state; `halt` stops naming the step, loss and
gradient leaf, and saves nothing after it; `skip` goes on and halts after N non-finite steps in a row."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np

from tests.fixtures import ROOT, make_setup, random_batch, write_resume_config


def _host(tree):
    return [np.array(x) for x in jax.device_get(jax.tree.leaves(tree))]


def test_nonfinite_step_leaves_the_state_unchanged_and_the_next_step_trains(tiny_bert):
    from jaxft import mesh

    s = make_setup(tiny_bert)
    m, state = s.mesh, s.state
    bad = random_batch()
    bad["weights"][:] = np.nan
    before, opt_before = _host(state.trainable), _host(state.opt_state)
    state, metrics = s.step(state, mesh.make_global_batch(bad, m))
    assert int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_leaf"]) >= 0
    assert not np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, _host(state.trainable)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(opt_before, _host(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1  # the batch is consumed; only the update is dropped
    state, metrics = s.step(state, mesh.make_global_batch(random_batch(seed=1), m))
    assert int(metrics["nonfinite"]) == 0 and int(metrics["nonfinite_leaf"]) == -1
    assert any(not np.array_equal(a, b) for a, b in zip(before, _host(state.trainable)))


def _train(config, run_dir, *overrides):
    args = [sys.executable, "-m", "jaxft.cli", "train", str(config), "--run-dir", str(run_dir), *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=600)


# A learning rate this large sends the parameters to ~1e30 after one step; the next forward overflows.
DIVERGE = ["optim.learning_rate=1e30", "optim.warmup_steps=0", "checkpoint.every_steps=1"]


def test_halt_names_step_loss_and_leaf_and_saves_nothing_after(tmp_path, tiny_bert, data_dir):
    from jaxft.checkpoint import complete_steps

    config = write_resume_config(tmp_path, tiny_bert)
    r = _train(config, tmp_path / "run", *DIVERGE, "train.nonfinite=halt")
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("jaxft: error: step 2: non-finite training (loss=nan") and "Traceback" not in r.stderr
    assert "first non-finite gradient: " in line and "halting (train.nonfinite=halt)" in line
    leaf = line.split("first non-finite gradient: ")[1].split()[0].rstrip(");,")
    assert re.fullmatch(r"(embeddings|encoder|pooler|classifier)/[\w/]+", leaf) and not leaf.endswith("value"), line
    assert complete_steps(tmp_path / "run") == [1]


def test_skip_counts_skipped_steps_and_halts_after_n_in_a_row(tmp_path, tiny_bert, data_dir):
    from jaxft.checkpoint import complete_steps

    config = write_resume_config(tmp_path, tiny_bert)
    run_dir = tmp_path / "run"
    r = _train(config, run_dir, *DIVERGE, "train.nonfinite=skip", "train.max_nonfinite_steps=3")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "step 4: non-finite training" in r.stderr and "3 non-finite steps in a row" in r.stderr
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["skipped_steps"]) for x in recs] == [(1, 0), (2, 1), (3, 2)]
    assert recs[1]["loss"] is None  # NaN is written as null: metrics.jsonl stays valid JSON
    # Skipped steps saved the unchanged (finite) state, so the run can be resumed with a sane config.
    assert complete_steps(run_dir) == [3, 2, 1]
