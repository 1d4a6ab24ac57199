"""Model families and the one registry that maps an HF config to a family: its spec, its NNX model and its
HF key table. Each family has a math file (bert.py, llama.py) and a key table (bert_hf.py, llama_hf.py).

Everyone outside models/ goes through `family_of` / `family_for_spec`; nothing else dispatches on model type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import bert_hf, gpt2_hf, llama_hf, lora
from jaxft.models.bert import BertModel, BertSpec
from jaxft.models.bert_hf import ArchitectureError
from jaxft.models.gpt2 import GPT2Model, GPT2Spec
from jaxft.models.llama import LlamaModel, LlamaSpec, RopeSpec
from jaxft.models.llama_hf import HFEntry

__all__ = [
    "ArchitectureError",
    "BertModel",
    "BertSpec",
    "Family",
    "GPT2Model",
    "GPT2Spec",
    "HFEntry",
    "LlamaModel",
    "LlamaSpec",
    "build_abstract_model",
    "family_for_spec",
    "family_of",
    "init_params",
    "spec_from_dict",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """What the engine needs to know of one model family; every field is a plain function of the spec."""

    name: str
    model_types: tuple[str, ...]
    tasks: tuple[str, ...]
    spec_class: type
    model_class: type
    # (hf config, task, num_labels, dropout_rate, scan_layers) -> spec
    read_spec: Callable[..., Any]
    # (parameter path, spec, prefix) -> the HF tensor(s) behind it, or None
    hf_entry: Callable[[str, Any, str], HFEntry | None]
    # (spec, hf config, checkpoint keys) -> the prefix of the checkpoint's body keys
    key_prefix: Callable[[Any, dict, set[str]], str]
    # spec -> regexes of checkpoint keys that may be present with no parameter
    ignorable_keys: Callable[[Any], tuple[str, ...]]
    # Spec fields that may differ between two checkpoints of the same model (a new head, dropout, layout).
    non_architecture: tuple[str, ...]
    layer_pattern: str  # regex of layer i's parameters, with {i}
    head_pattern: str  # regex of the task head's parameters


def _bert_spec(hf: dict, task: str, num_labels: int, dropout_rate: float, scan_layers: bool) -> BertSpec:
    return bert_hf.spec_from_hf_config(hf, task, num_labels, dropout_rate)


def _bert_entry(path: str, spec: BertSpec, prefix: str) -> HFEntry | None:
    found = bert_hf.hf_key_for(path, prefix)
    return None if found is None else HFEntry((found[0],), found[1], False)


def _bert_prefix(spec: BertSpec, hf: dict, keys: set[str]) -> str:
    # Task checkpoints prefix the body ("bert."); bare encoders (BertModel, MiniLM) do not.
    prefix = bert_hf.body_prefix(spec, hf.get("model_type", "bert"))
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def _llama_spec(hf: dict, task: str, num_labels: int, dropout_rate: float, scan_layers: bool) -> LlamaSpec:
    return llama_hf.spec_from_hf_config(hf, scan_layers=scan_layers)


def _llama_entry(path: str, spec: LlamaSpec, prefix: str) -> HFEntry | None:
    return llama_hf.hf_entry(path, spec.num_layers)


def _gpt2_spec(hf: dict, task: str, num_labels: int, dropout_rate: float, scan_layers: bool) -> GPT2Spec:
    return gpt2_hf.spec_from_hf_config(hf, scan_layers=scan_layers)


def _gpt2_entry(path: str, spec: GPT2Spec, prefix: str) -> HFEntry | None:
    return gpt2_hf.hf_entry(path, spec.num_layers, prefix)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=bert_hf.SUPPORTED_MODEL_TYPES,
        tasks=("sequence-classification", "token-classification"),
        spec_class=BertSpec,
        model_class=BertModel,
        read_spec=_bert_spec,
        hf_entry=_bert_entry,
        key_prefix=_bert_prefix,
        ignorable_keys=lambda spec: (),
        non_architecture=("task", "num_labels", "dropout_rate"),
        layer_pattern=r"encoder/layers/{i}/.*",
        head_pattern=r"(pooler|classifier)/.*",
    ),
    Family(
        name="llama",
        model_types=llama_hf.SUPPORTED_MODEL_TYPES,
        tasks=("causal-lm",),
        spec_class=LlamaSpec,
        model_class=LlamaModel,
        read_spec=_llama_spec,
        hf_entry=_llama_entry,
        key_prefix=lambda spec, hf, keys: "",
        ignorable_keys=llama_hf.ignorable_keys,
        non_architecture=("scan_layers",),
        layer_pattern=r"layers/{i}/.*",
        head_pattern=r"(lm_head|norm)/.*",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        tasks=("causal-lm",),
        spec_class=GPT2Spec,
        model_class=GPT2Model,
        read_spec=_gpt2_spec,
        hf_entry=_gpt2_entry,
        key_prefix=lambda spec, hf, keys: gpt2_hf.detect_prefix(sorted(keys)),
        ignorable_keys=gpt2_hf.ignorable_keys,
        non_architecture=("scan_layers",),
        layer_pattern=r"layers/{i}/.*",
        head_pattern=r"ln_f/.*",  # the LM head is tied to wte
    ),
)


def family_of(hf: dict[str, Any], task: str) -> Family:
    """The family of an HF config.json; ArchitectureError names an unknown model type or an unsupported task."""
    model_type = hf.get("model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            if task not in family.tasks:
                raise ArchitectureError(
                    f"model_type {model_type!r} does not support model.task={task!r} (it supports: "
                    f"{', '.join(family.tasks)})"
                )
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ArchitectureError(f"model_type {model_type!r} is not supported (supported: {known})")


def family_for_spec(spec: Any) -> Family:
    for family in FAMILIES:
        if isinstance(spec, family.spec_class):
            return family
    raise TypeError(f"no family for {type(spec).__name__}")


def spec_from_dict(family_name: str, d: dict[str, Any]) -> Any:
    """A spec from its dataclasses.asdict form (as stored in run.json and checkpoints)."""
    family = next((f for f in FAMILIES if f.name == family_name), None)
    if family is None:
        raise ArchitectureError(f"unknown model family {family_name!r}")
    fields = {f.name for f in dataclasses.fields(family.spec_class)}
    values = {k: v for k, v in d.items() if k in fields}
    if family.spec_class is LlamaSpec:
        for key in ("rope", "local_rope"):
            if isinstance(values.get(key), dict):
                values[key] = RopeSpec(**values[key])
        if isinstance(values.get("layer_types"), list):
            values["layer_types"] = tuple(values["layer_types"])
    return family.spec_class(**values)


def architecture_differences(family_name: str, saved: dict[str, Any], spec: Any) -> list[str]:
    """'field saved vs now' for every architecture field that differs (not the head, dropout or layout)."""
    family = family_for_spec(spec)
    if family_name != family.name:
        return [f"family {family_name!r} vs {family.name!r}"]
    now = json.loads(json.dumps(dataclasses.asdict(spec)))  # as saved: tuples are lists
    # A field that a checkpoint of an older jaxft lacks had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(spec) if f.default is not dataclasses.MISSING}
    defaults = json.loads(json.dumps(defaults, default=lambda x: dataclasses.asdict(x)))
    keys = [k for k in now if k not in family.non_architecture]
    before = {k: saved.get(k, defaults.get(k)) for k in keys}
    return [f"{k} {before[k]!r} vs {now[k]!r}" for k in keys if before[k] != now[k]]


def _make_model(spec: Any, seed: int, param_dtype: Any, lora_spec: lora.LoraSpec | None = None) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    model = family_for_spec(spec).model_class(spec, rngs=rngs, param_dtype=jnp.dtype(param_dtype))
    if lora_spec is not None:
        lora.attach(model, lora_spec, rngs)
    return model


def build_abstract_model(
    spec: Any, param_dtype: Any = jnp.float32, lora_spec: lora.LoraSpec | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes only: the graph definition and a State of ShapeDtypeStructs carrying logical axis metadata
    (with LoRA adapters on the targeted layers when `lora_spec` is given)."""
    return nnx.split(nnx.eval_shape(lambda: _make_model(spec, 0, param_dtype, lora_spec)))


def init_params(
    spec: Any,
    param_dtype: Any,
    wanted: set[str],
    shardings: dict[str, Any],
    seed: int,
    lora_spec: lora.LoraSpec | None = None,
) -> dict[str, jax.Array]:
    """Fresh initial values for the `wanted` parameter paths only, created directly in their shardings.

    The whole model's init is traced, but XLA drops every initializer whose output is not requested,
    so only the wanted tensors (typically a new head) are ever computed.
    """
    from jaxft.paths import path_str

    if not wanted:
        return {}

    def init():
        model = _make_model(spec, seed, param_dtype, lora_spec)
        return {path_str(p): v.get_value() for p, v in nnx.state(model).flat_state() if path_str(p) in wanted}

    return jax.jit(init, out_shardings={p: shardings[p] for p in wanted})()
