"""Parameter paths against ordered regex rules: first full match wins, uncovered paths and dead rules are errors."""

import jax
import pytest

from jaxft.paths import RuleError, compile_patterns, match_first, matches_any, path_str

PATHS = ["embeddings/word", "encoder/layers/0/kernel", "encoder/layers/1/kernel", "classifier/kernel"]


@pytest.mark.parametrize(
    "path, expected",
    [
        (("encoder", "layers", 0, "kernel"), "encoder/layers/0/kernel"),
        ((), ""),
        (("a",), "a"),
        ((jax.tree_util.DictKey("a"), jax.tree_util.GetAttrKey("b"), 3), "a/b/3"),
    ],
)
def test_path_str(path, expected):
    assert path_str(path) == expected


def test_path_str_of_a_real_pytree():
    flat = jax.tree_util.tree_flatten_with_path({"encoder": {"kernel": 1, "bias": 2}})[0]
    assert [path_str(p) for p, _ in flat] == ["encoder/bias", "encoder/kernel"]


def test_compile_patterns():
    compiled = compile_patterns([r"a/.*", "b"], "load.new_params")
    assert [c.pattern for c in compiled] == [r"a/.*", "b"]
    assert compile_patterns([], "x") == []


def test_compile_patterns_names_the_bad_regex():
    with pytest.raises(RuleError, match=r"^lora\.targets\[1\]: '\(q' is not a valid regex \(missing \), "):
        compile_patterns(["ok", "(q"], "lora.targets")


def test_match_first_takes_the_first_full_match():
    rules = [r"encoder/layers/0/.*", r"encoder/.*", r".*"]
    assert match_first(PATHS, rules, "freeze.rules") == {
        "embeddings/word": 2,
        "encoder/layers/0/kernel": 0,
        "encoder/layers/1/kernel": 1,
        "classifier/kernel": 2,
    }


def test_match_first_needs_a_full_match():
    assert match_first(["ab", "a"], ["a", "ab"], "x") == {"ab": 1, "a": 0}
    with pytest.raises(RuleError, match="no rule covers 1 parameter"):
        match_first(["encoder/kernel"], ["kernel", "encoder"], "x", require_used=False)


def test_match_first_lists_every_uncovered_path():
    with pytest.raises(RuleError) as e:
        match_first(PATHS, [r"encoder/.*"], "freeze.rules")
    assert str(e.value) == "freeze.rules: no rule covers 2 parameter(s): embeddings/word, classifier/kernel"


def test_match_first_shortens_a_long_uncovered_list():
    paths = [f"p{i}" for i in range(11)]
    with pytest.raises(RuleError) as e:
        match_first(paths, ["q"], "freeze.rules")
    assert str(e.value) == ("freeze.rules: no rule covers 11 parameter(s): p0, p1, p2, p3, p4, p5, p6, p7 (+3 more)")


def test_match_first_lists_every_dead_rule():
    with pytest.raises(RuleError) as e:
        match_first(PATHS, [r"pooler/.*", r".*", r"classifier/.*"], "freeze.rules")
    assert str(e.value) == "freeze.rules: rule(s) matched no parameter: 'pooler/.*', 'classifier/.*'"


def test_match_first_reports_uncovered_before_dead():
    with pytest.raises(RuleError, match="^x: no rule covers 1 parameter"):
        match_first(["a"], ["b"], "x")


def test_match_first_without_cover_leaves_none():
    assert match_first(PATHS, [r"encoder/.*"], "load.new_params", require_cover=False) == {
        "embeddings/word": None,
        "encoder/layers/0/kernel": 0,
        "encoder/layers/1/kernel": 0,
        "classifier/kernel": None,
    }


def test_match_first_without_used_allows_dead_rules():
    assert match_first(["a"], ["a", "b", "a"], "x", require_used=False) == {"a": 0}
    with pytest.raises(RuleError, match=r"^x: rule\(s\) matched no parameter: 'b', 'a'$"):
        match_first(["a"], ["a", "b", "a"], "x")


def test_match_first_bad_regex_is_a_rule_error():
    with pytest.raises(RuleError, match=r"^freeze\.rules\[0\]: '\[' is not a valid regex"):
        match_first(["a"], ["["], "freeze.rules")


def test_match_first_empty():
    assert match_first([], [], "x") == {}
    with pytest.raises(RuleError, match=r"^x: rule\(s\) matched no parameter: '\.\*'$"):
        match_first([], [".*"], "x")


@pytest.mark.parametrize(
    "path, patterns, expected",
    [
        ("cls.predictions.bias", [r"cls\..*"], True),
        ("bert.cls.bias", [r"cls\..*"], False),
        ("position_ids", [r"cls\..*", r".*position_ids"], True),
        ("a", [], False),
        ("ab", ["a"], False),
    ],
)
def test_matches_any(path, patterns, expected):
    assert matches_any(path, patterns) is expected


def test_rule_error_is_a_value_error():
    assert issubclass(RuleError, ValueError)
