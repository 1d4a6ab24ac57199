"""Freeze rules → the trainable partition and per-parameter LR multipliers, plus the report of what matched.

Rules are ordered (path regex, action) pairs; the first match wins, every parameter must be covered and
every rule must match something. Frozen parameters get no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxft import paths


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    rules: tuple[tuple, ...]
    rule_of: dict[str, int]  # parameter path -> index of the rule that took it
    shapes: dict[str, tuple[int, ...]]

    def is_trainable(self, path: str) -> bool:
        return self.rules[self.rule_of[path]][1] == "train"

    def lr_multiplier(self, path: str) -> float:
        rule = self.rules[self.rule_of[path]]
        return float(rule[2]) if len(rule) == 3 else 1.0

    @property
    def trainable_paths(self) -> list[str]:
        return [p for p in self.rule_of if self.is_trainable(p)]

    def count(self, trainable: bool) -> int:
        return sum(_numel(s) for p, s in self.shapes.items() if self.is_trainable(p) == trainable)

    def report(self) -> str:
        """A table: each rule, its action, how many parameters (tensors and elements) it took, examples."""
        lines = [f"{'#':>2}  {'rule':<32} {'action':<12} {'tensors':>7} {'params':>11}  matched"]
        for i, rule in enumerate(self.rules):
            taken = [p for p, r in self.rule_of.items() if r == i]
            action = rule[1] if len(rule) == 2 else f"train×{rule[2]:g}"
            n = sum(_numel(self.shapes[p]) for p in taken)
            shown = ", ".join(taken[:3]) + (f", … (+{len(taken) - 3})" if len(taken) > 3 else "")
            lines.append(f"{i:>2}  {rule[0]:<32} {action:<12} {len(taken):>7} {n:>11,}  {shown}")
        t, f = self.count(True), self.count(False)
        lines.append(f"trainable {t:,} / frozen {f:,} parameters ({100 * t / max(t + f, 1):.1f}% trainable)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "rules": [list(r) for r in self.rules],
            "params": {
                p: {"rule": i, "trainable": self.is_trainable(p), "lr_multiplier": self.lr_multiplier(p)}
                for p, i in self.rule_of.items()
            },
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_freeze_plan(shapes: dict[str, tuple[int, ...]], rules: Sequence[tuple]) -> FreezePlan:
    rules = tuple(tuple(r) for r in rules)
    rule_of = paths.match_first(list(shapes), [r[0] for r in rules], "freeze.rules")
    if not any(r[1] == "train" for r in (rules[i] for i in rule_of.values())):
        raise paths.RuleError("freeze.rules: every parameter is frozen; nothing would train")
    return FreezePlan(rules, rule_of, dict(shapes))


# ----------------------------------------------------------------------------------------- rule helpers
# Each returns a list of rules to put in FreezeConfig.rules; they compose by concatenation.


def freeze_embeddings_and_first_layers(num_layers: int) -> list[tuple]:
    """The classic recipe: freeze the embeddings and encoder layers 0..num_layers-1, train the rest."""
    rules: list[tuple] = [(r"embeddings/.*", "freeze")]
    if num_layers > 0:
        rules.append((rf"encoder/layers/({_alternation(range(num_layers))})/.*", "freeze"))
    rules.append((r".*", "train"))
    return rules


def layerwise_lr_decay(decay: float, num_layers: int) -> list[tuple]:
    """Top layer at the base LR, each lower layer × decay, embeddings × decay^(num_layers+1)."""
    rules: list[tuple] = [(r"(pooler|classifier)/.*", "train")]
    for i in reversed(range(num_layers)):
        rules.append((rf"encoder/layers/{i}/.*", "train", decay ** (num_layers - i)))
    rules.append((r"embeddings/.*", "train", decay ** (num_layers + 1)))
    return rules


def _alternation(indices) -> str:
    return "|".join(str(i) for i in indices)


def unfreeze_groups(
    plan: FreezePlan,
    num_layers: int,
    layer_pattern: str = r"encoder/layers/{i}/.*",
    head_pattern: str = r"(pooler|classifier)/.*",
) -> list[list[str]]:
    """Trainable parameters in layer groups, top down: head, layer N-1, …, layer 0, the rest (embeddings).
    `layer_pattern` names layer i's parameters, `head_pattern` the head's (each family has its own)."""
    patterns = [head_pattern] + [layer_pattern.format(i=i) for i in reversed(range(num_layers))]
    patterns.append(r".*")
    taken = paths.match_first(plan.trainable_paths, patterns, "gradual unfreezing groups", require_used=False)
    groups: list[list[str]] = [[] for _ in patterns]
    for p, i in taken.items():
        groups[i].append(p)
    return [g for g in groups if g]


def active_paths(groups: list[list[str]], step: int, every_steps: int) -> set[str]:
    """Gradual unfreezing: the first group trains from step 0, one more joins every `every_steps`."""
    n = len(groups) if every_steps <= 0 else min(len(groups), 1 + step // every_steps)
    return {p for g in groups[:n] for p in g}


def train_adapters_only() -> list[tuple]:
    """LoRA: train the adapters (lora_a, lora_b), freeze everything else (the base model)."""
    return [(r".*/lora_[ab]", "train"), (r".*", "freeze")]
