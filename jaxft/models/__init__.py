"""Model families and the one registry that maps an HF config to a family. Each family is two files, its math
(bert.py, llama.py, gpt2.py) and its HF key table (bert_hf.py, ...), plus one `Family` row below: everything the
engine needs to know of it is a field of that row.

Everyone outside models/ goes through `family_of` / `family_for_spec` / `family_named`; nothing else dispatches on
the model type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.models import bert_hf, gpt2_hf, llama_hf, lora, vit_hf
from jaxft.models.bert import BertModel, BertSpec
from jaxft.models.gpt2 import GPT2Model, GPT2Spec
from jaxft.models.hf_layout import ArchitectureError, HFEntry, KeyRenames
from jaxft.models.llama import LlamaModel, LlamaSpec
from jaxft.models.vit import ViTModel, ViTSpec

__all__ = [
    "ArchitectureError",
    "BertModel",
    "BertSpec",
    "FAMILIES",
    "Family",
    "GPT2Model",
    "GPT2Spec",
    "HFEntry",
    "LlamaModel",
    "LlamaSpec",
    "ViTModel",
    "ViTSpec",
    "architecture_differences",
    "build_abstract_model",
    "family_for_spec",
    "family_named",
    "family_of",
    "init_params",
    "spec_from_dict",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """What the engine needs to know of one model family; every field is data or a plain function of the spec."""

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
    # How the family's older checkpoints name keys that the table writes in torch style.
    renames: KeyRenames
    # Export: model_type -> the prefix the task class's body keys carry; (spec, model_type) -> its class name;
    # (spec, prefix) -> the class's state-dict keys, written out from its modeling code.
    export_prefix: Callable[[str], str]
    hf_class_name: Callable[[Any, str], str]
    hf_state_keys: Callable[[Any, str], set[str]]
    # spec -> the jaxft task the model runs (model.task)
    task_of: Callable[[Any], str]
    # spec -> the longest sequence the model can position (a learned table), or None (RoPE: no hard limit)
    position_limit: Callable[[Any], int | None]
    # Spec fields that may differ between two checkpoints of the same model (a new head, dropout, layout).
    non_architecture: tuple[str, ...]
    # Freeze recipes and gradual unfreezing name parts of the model by these regexes.
    embedding_pattern: str  # the input embeddings
    layer_pattern: str  # layer i's parameters, with {i}
    head_pattern: str  # the task head
    # spec -> the shape of one input example other than token ids: (C, H, W) pixels for image models
    input_shape: Callable[[Any], tuple[int, ...]] = lambda spec: ()

    @property
    def is_decoder(self) -> bool:
        return self.tasks == ("causal-lm",)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert",
        model_types=bert_hf.SUPPORTED_MODEL_TYPES,
        tasks=("sequence-classification", "token-classification"),
        spec_class=BertSpec,
        model_class=BertModel,
        read_spec=lambda hf, task, labels, dropout, scan: bert_hf.spec_from_hf_config(hf, task, labels, dropout),
        hf_entry=bert_hf.hf_entry,
        key_prefix=bert_hf.detect_prefix,
        ignorable_keys=lambda spec: (),
        renames=bert_hf.RENAMES,
        export_prefix=bert_hf.body_prefix,
        hf_class_name=bert_hf.hf_class_name,
        hf_state_keys=bert_hf.hf_state_keys,
        task_of=lambda spec: spec.task,
        position_limit=lambda spec: spec.max_positions,
        non_architecture=("task", "num_labels", "dropout_rate"),
        embedding_pattern=r"embeddings/.*",
        layer_pattern=r"encoder/layers/{i}/.*",
        head_pattern=r"(pooler|classifier)/.*",
    ),
    Family(
        name="llama",
        model_types=llama_hf.SUPPORTED_MODEL_TYPES,
        tasks=("causal-lm",),
        spec_class=LlamaSpec,
        model_class=LlamaModel,
        read_spec=lambda hf, task, labels, dropout, scan: llama_hf.spec_from_hf_config(hf, scan_layers=scan),
        hf_entry=lambda path, spec, prefix: llama_hf.hf_entry(path, spec.num_layers),
        key_prefix=lambda spec, hf, keys: "",
        ignorable_keys=llama_hf.ignorable_keys,
        renames=llama_hf.RENAMES,
        export_prefix=lambda model_type: "",  # the table writes the body's "model." itself
        hf_class_name=llama_hf.hf_class_name,
        hf_state_keys=llama_hf.hf_state_keys,
        task_of=lambda spec: "causal-lm",
        position_limit=lambda spec: None,
        non_architecture=("scan_layers",),
        embedding_pattern=r"embed_tokens",
        layer_pattern=r"layers/{i}/.*",
        head_pattern=r"(lm_head|norm)/.*",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        tasks=("causal-lm",),
        spec_class=GPT2Spec,
        model_class=GPT2Model,
        read_spec=lambda hf, task, labels, dropout, scan: gpt2_hf.spec_from_hf_config(hf, scan_layers=scan),
        hf_entry=lambda path, spec, prefix: gpt2_hf.hf_entry(path, spec.num_layers, prefix),
        key_prefix=lambda spec, hf, keys: gpt2_hf.detect_prefix(sorted(keys)),
        ignorable_keys=gpt2_hf.ignorable_keys,
        renames=gpt2_hf.RENAMES,
        export_prefix=lambda model_type: gpt2_hf.BODY_PREFIX,
        hf_class_name=lambda spec, model_type: gpt2_hf.CLASS_NAME,
        hf_state_keys=gpt2_hf.hf_state_keys,
        task_of=lambda spec: "causal-lm",
        position_limit=lambda spec: spec.max_positions,  # the learned wpe table
        non_architecture=("scan_layers",),
        embedding_pattern=r"(wte|wpe)",
        layer_pattern=r"layers/{i}/.*",
        head_pattern=r"ln_f/.*",  # the LM head is tied to wte
    ),
    Family(
        name="vit",
        model_types=vit_hf.SUPPORTED_MODEL_TYPES,
        tasks=("image-classification",),
        spec_class=ViTSpec,
        model_class=ViTModel,
        read_spec=lambda hf, task, labels, dropout, scan: vit_hf.spec_from_hf_config(
            hf, labels, dropout, scan_layers=scan
        ),
        hf_entry=vit_hf.hf_entry,
        key_prefix=vit_hf.detect_prefix,
        ignorable_keys=vit_hf.ignorable_keys,
        renames=vit_hf.RENAMES,
        export_prefix=vit_hf.body_prefix,
        hf_class_name=vit_hf.hf_class_name,
        hf_state_keys=vit_hf.hf_state_keys,
        task_of=lambda spec: "image-classification",
        position_limit=lambda spec: None,  # the position table is the image's patch grid, not a sequence limit
        non_architecture=("num_labels", "dropout_rate", "attention_dropout_rate", "scan_layers"),
        embedding_pattern=r"embeddings/.*",
        layer_pattern=r"layers/{i}/.*",
        head_pattern=r"(norm|classifier|cls_classifier|distillation_classifier)/.*",
        input_shape=lambda spec: (spec.num_channels, spec.image_size, spec.image_size),
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


def family_named(name: str) -> Family:
    """The family a run dir or checkpoint records by name; ArchitectureError for one this jaxft does not know."""
    family = next((f for f in FAMILIES if f.name == name), None)
    if family is None:
        raise ArchitectureError(f"unknown model family {name!r} (known: {', '.join(f.name for f in FAMILIES)})")
    return family


def spec_from_dict(family_name: str, d: dict[str, Any]) -> Any:
    """A spec from its dataclasses.asdict form (as stored in run.json and checkpoints): nested specs come back as
    their dataclasses and lists as tuples; a field that an older checkpoint lacks keeps its default."""
    cls = family_named(family_name).spec_class
    hints = typing.get_type_hints(cls)
    values = {f.name: _field_from_json(d[f.name], hints[f.name]) for f in dataclasses.fields(cls) if f.name in d}
    return cls(**values)


def _field_from_json(value: Any, tp: Any) -> Any:
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return option(**value)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            return tuple(value)
    return value


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
        return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model)) if path_str(p) in wanted}

    return jax.jit(init, out_shardings={p: shardings[p] for p in wanted})()
