"""Freezing: frozen leaves bit-identical, trainable ones move, optimizer state only for trainable leaves."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft import freeze, mesh, models
from jaxft.paths import RuleError, path_str
from tests.fixtures import make_setup, random_batch

RULES = freeze.freeze_embeddings_and_first_layers(1)  # tiny model has 2 layers: layer 1 + head train


def _leaves(state_part):
    return {path_str(p): np.asarray(jax.device_get(v.get_value())) for p, v in nnx.to_flat_state(state_part)}


def test_frozen_bit_identical_trainable_changed_optimizer_sized_to_trainable(tiny_bert):
    s = make_setup(tiny_bert, (2, 4, 1), rules=RULES)
    state = s.state
    before_frozen, before_train = _leaves(state.frozen), _leaves(state.trainable)
    assert set(before_frozen) == {p for p in s.plan.rule_of if not s.plan.is_trainable(p)}
    assert all(p.startswith(("embeddings/", "encoder/layers/0/")) for p in before_frozen)
    for seed in range(3):
        state, _ = s.step(state, mesh.make_global_batch(random_batch(seed=seed), s.mesh))
    after_frozen, after_train = _leaves(state.frozen), _leaves(state.trainable)
    for p, v in before_frozen.items():
        np.testing.assert_array_equal(after_frozen[p], v, err_msg=p)
    changed = [p for p, v in before_train.items() if not np.array_equal(after_train[p], v)]
    assert set(changed) == set(before_train)
    # Adam's mu and nu hold exactly the trainable elements, nothing for the frozen ones.
    opt_elems = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_elems == 2 * s.plan.count(True)
    assert s.plan.count(False) > s.plan.count(True)


def test_lr_multiplier_scales_updates(tiny_bert):
    rules = [(r"classifier/.*", "train", 0.0001), (r".*", "train")]
    s = make_setup(tiny_bert, (8, 1, 1), rules=rules)
    state0 = _leaves(s.state.trainable)
    state, _ = s.step(s.state, mesh.make_global_batch(random_batch(), s.mesh))
    after = _leaves(state.trainable)
    head = np.abs(after["classifier/kernel"] - state0["classifier/kernel"]).max()
    body = np.abs(after["pooler/dense/kernel"] - state0["pooler/dense/kernel"]).max()
    assert 0 < head < body / 100


def test_uncovered_parameter_and_unused_rule_are_errors():
    shapes = {"embeddings/word/embedding": (4, 2), "classifier/kernel": (2, 2)}
    with pytest.raises(RuleError, match="no rule covers 1 parameter.*embeddings/word/embedding"):
        freeze.build_freeze_plan(shapes, [(r"classifier/.*", "train")])
    with pytest.raises(RuleError, match=r"matched no parameter: 'pooler/.\*'"):
        freeze.build_freeze_plan(shapes, [(r"pooler/.*", "freeze"), (r".*", "train")])
    with pytest.raises(RuleError, match="every parameter is frozen"):
        freeze.build_freeze_plan(shapes, [(r".*", "freeze")])


def test_report_lists_each_rule_with_counts():
    shapes = {"embeddings/word/embedding": (4, 2), "classifier/kernel": (2, 2), "classifier/bias": (2,)}
    plan = freeze.build_freeze_plan(shapes, [(r"embeddings/.*", "freeze"), (r".*", "train", 0.5)])
    report = plan.report()
    assert "embeddings/.*" in report and "freeze" in report and "train×0.5" in report
    assert "trainable 6 / frozen 8" in report


def test_layerwise_lr_decay_rules():
    rules = freeze.layerwise_lr_decay(0.5, 2)
    shapes = {
        "embeddings/word/embedding": (1,),
        "encoder/layers/0/up/kernel": (1,),
        "encoder/layers/1/up/kernel": (1,),
        "classifier/kernel": (1,),
        "pooler/dense/kernel": (1,),
    }
    plan = freeze.build_freeze_plan(shapes, rules)
    assert plan.lr_multiplier("classifier/kernel") == 1.0
    assert plan.lr_multiplier("encoder/layers/1/up/kernel") == 0.5
    assert plan.lr_multiplier("encoder/layers/0/up/kernel") == 0.25
    assert plan.lr_multiplier("embeddings/word/embedding") == 0.125


def test_gradual_unfreezing_groups_top_down():
    shapes = {
        "embeddings/word/embedding": (1,),
        "encoder/layers/0/up/kernel": (1,),
        "encoder/layers/1/up/kernel": (1,),
        "classifier/kernel": (1,),
    }
    plan = freeze.build_freeze_plan(shapes, [(r".*", "train")])
    bert = models.family_named("bert")
    phases = freeze.build_phases(plan, 2, bert.layer_pattern, bert.head_pattern, 10)
    assert phases.groups == (
        ("classifier/kernel",),
        ("encoder/layers/1/up/kernel",),
        ("encoder/layers/0/up/kernel",),
        ("embeddings/word/embedding",),
    )
    assert phases.phase_at(0).trainable_paths == {"classifier/kernel"}
    assert phases.phase_at(10).trainable_paths == {"classifier/kernel", "encoder/layers/1/up/kernel"}
    assert len(phases.phase_at(1000).trainable_paths) == 4
