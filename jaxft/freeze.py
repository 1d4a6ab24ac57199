"""Freeze rules → the trainable partition and per-parameter LR multipliers, the report of what each rule matched, and
the freeze phases of gradual unfreezing (immutable: the phase of a step is a function of the step).

Rules are ordered FreezeRules; the first match wins, every parameter must be covered and every rule must match
something. Frozen parameters get no gradient and no optimizer state. The recipes below name a family's parts
through its registry row, never by its parameter paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from typing import Any

from jaxft import models, paths
from jaxft.config import FreezeRule
from jaxft.models.lora import ADAPTER_PARAMS


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    rules: tuple[FreezeRule, ...]
    rule_of: dict[str, int]  # parameter path -> index of the rule that took it
    shapes: dict[str, tuple[int, ...]]

    def rule_for(self, path: str) -> FreezeRule:
        return self.rules[self.rule_of[path]]

    def is_trainable(self, path: str) -> bool:
        return self.rule_for(path).trains

    def lr_multiplier(self, path: str) -> float:
        return self.rule_for(path).lr_multiplier

    @property
    def trainable_paths(self) -> list[str]:
        return [p for p in self.rule_of if self.is_trainable(p)]

    @property
    def frozen_paths(self) -> set[str]:
        """Parameters no phase ever trains."""
        return {p for p in self.rule_of if not self.is_trainable(p)}

    def count(self, trainable: bool) -> int:
        return sum(math.prod(s) for p, s in self.shapes.items() if self.is_trainable(p) == trainable)

    def report(self) -> str:
        """A table: each rule, its action, how many parameters (tensors and elements) it took, examples."""
        lines = [f"{'#':>2}  {'rule':<32} {'action':<12} {'tensors':>7} {'params':>11}  matched"]
        for i, rule in enumerate(self.rules):
            taken = [p for p, r in self.rule_of.items() if r == i]
            action = rule.action if rule.lr_multiplier == 1.0 else f"train×{rule.lr_multiplier:g}"
            n = sum(math.prod(self.shapes[p]) for p in taken)
            shown = ", ".join(taken[:3]) + (f", … (+{len(taken) - 3})" if len(taken) > 3 else "")
            lines.append(f"{i:>2}  {rule.pattern:<32} {action:<12} {len(taken):>7} {n:>11,}  {shown}")
        t, f = self.count(True), self.count(False)
        lines.append(f"trainable {t:,} / frozen {f:,} parameters ({100 * t / max(t + f, 1):.1f}% trainable)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": [rule.to_json() for rule in self.rules],
            "params": {
                p: {"rule": i, "trainable": self.is_trainable(p), "lr_multiplier": self.lr_multiplier(p)}
                for p, i in self.rule_of.items()
            },
        }


def build_freeze_plan(shapes: dict[str, tuple[int, ...]], rules: Sequence[Any]) -> FreezePlan:
    rules = tuple(FreezeRule.of(i, r) for i, r in enumerate(rules))
    rule_of = paths.match_first(list(shapes), [r.pattern for r in rules], "freeze.rules")
    if not any(rules[i].trains for i in rule_of.values()):
        raise paths.RuleError("freeze.rules: every parameter is frozen; nothing would train")
    return FreezePlan(rules, rule_of, dict(shapes))


# ------------------------------------------------------------------------------------------------ phases


@dataclasses.dataclass(frozen=True)
class FreezePhase:
    """What one stretch of a run trains. Phases are equal when they train the same parameters."""

    index: int = dataclasses.field(compare=False)  # 0.. in order of a run; -1 for a set no phase of the plan has
    trainable_paths: frozenset[str]


@dataclasses.dataclass(frozen=True)
class FreezePhases:
    """Gradual unfreezing: the trainable parameters in layer groups, top down (head, layer N-1, …, layer 0, the
    rest); the first group trains from step 0 and one more joins every `every_steps` (0: all train at once)."""

    groups: tuple[tuple[str, ...], ...]
    every_steps: int

    def phase_at(self, step: int) -> FreezePhase:
        """The phase that step index `step` (0-based: the step run when state.step == step) trains in."""
        n = len(self.groups) if self.every_steps <= 0 else min(len(self.groups), 1 + step // self.every_steps)
        return FreezePhase(n - 1, frozenset(p for g in self.groups[:n] for p in g))

    def phase_of(self, trainable_paths: Collection[str]) -> FreezePhase:
        """The phase that trains exactly `trainable_paths` (a checkpoint's); index -1 if none does (a resume that
        changed the rules on purpose)."""
        wanted = frozenset(trainable_paths)
        for n in range(1, len(self.groups) + 1):
            if frozenset(p for g in self.groups[:n] for p in g) == wanted:
                return FreezePhase(n - 1, wanted)
        return FreezePhase(-1, wanted)


def build_phases(
    plan: FreezePlan, num_layers: int, layer_pattern: str, head_pattern: str, every_steps: int
) -> FreezePhases:
    """The plan's trainable parameters in unfreezing groups: `head_pattern` first, then `layer_pattern` (with {i})
    for layer N-1 down to 0, then whatever is left (embeddings); empty groups are dropped."""
    patterns = [head_pattern] + [layer_pattern.format(i=i) for i in reversed(range(num_layers))] + [r".*"]
    taken = paths.match_first(plan.trainable_paths, patterns, "gradual unfreezing groups", require_used=False)
    groups: list[list[str]] = [[] for _ in patterns]
    for p, i in taken.items():
        groups[i].append(p)
    return FreezePhases(tuple(tuple(g) for g in groups if g), every_steps)


# ----------------------------------------------------------------------------------------------- recipes
# Each returns rules to put in FreezeConfig.rules; they compose by concatenation. `family` names the model family
# (models.FAMILIES) whose parts they refer to.


def freeze_embeddings_and_first_layers(num_layers: int, family: str = "bert") -> list[FreezeRule]:
    """The classic recipe: freeze the embeddings and layers 0..num_layers-1, train the rest."""
    parts = models.family_named(family)
    rules = [FreezeRule(parts.embedding_pattern, "freeze")]
    if num_layers > 0:
        indices = "|".join(str(i) for i in range(num_layers))
        rules.append(FreezeRule(parts.layer_pattern.format(i=f"({indices})"), "freeze"))
    return rules + [FreezeRule(r".*", "train")]


def layerwise_lr_decay(decay: float, num_layers: int, family: str = "bert") -> list[FreezeRule]:
    """Layer-wise LR decay: the head and top layer at the base LR, each lower layer × decay, the embeddings ×
    decay^(num_layers+1). Everything else the family has (e.g. a decoder's final norm) must be covered by the head
    or embedding patterns, or a rule appended."""
    parts = models.family_named(family)
    rules = [FreezeRule(parts.head_pattern, "train")]
    for i in reversed(range(num_layers)):
        rules.append(FreezeRule(parts.layer_pattern.format(i=i), "train", decay ** (num_layers - i)))
    return rules + [FreezeRule(parts.embedding_pattern, "train", decay ** (num_layers + 1))]


def train_adapters_only() -> list[FreezeRule]:
    """LoRA: train the adapters (lora_a, lora_b), freeze everything else (the base model)."""
    return [FreezeRule(ADAPTER_PARAMS, "train"), FreezeRule(r".*", "freeze")]
