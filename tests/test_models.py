"""The family registry: lookups by name, spec and HF config (and their errors), specs read from small HF config
dicts and restored from their saved (JSON) form, each row's fields (class names per task, position limit, the
part patterns against the model's real parameter paths), and architecture differences."""

import dataclasses
import json
import re

import pytest
from flax import nnx

from jaxft import models
from jaxft.models import (
    FAMILIES,
    ArchitectureError,
    BertSpec,
    GPT2Spec,
    LlamaSpec,
    ViTSpec,
    architecture_differences,
    build_abstract_model,
    family_for_spec,
    family_named,
    family_of,
    spec_from_dict,
)
from jaxft.models.llama import RopeSpec
from jaxft.paths import path_str

BERT_HF = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-7,
    "hidden_dropout_prob": 0.3,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
LLAMA_HF = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}
GEMMA3_HF = {
    "model_type": "gemma3_text",
    "vocab_size": 50,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
}
GPT2_HF = {
    "model_type": "gpt2",
    "vocab_size": 50,
    "n_embd": 8,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 16,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
}


def read(hf: dict, task: str, num_labels: int = 2, dropout: float = -1.0, scan: bool = True):
    return family_of(hf, task).read_spec(hf, task, num_labels, dropout, scan)


def saved_form(spec) -> dict:
    """A spec as run.json and checkpoints store it: tuples become lists, nested specs dicts."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


@pytest.mark.parametrize(
    "name, spec_class", [("bert", BertSpec), ("llama", LlamaSpec), ("gpt2", GPT2Spec), ("vit", ViTSpec)]
)
def test_family_named_and_for_spec(name, spec_class):
    family = family_named(name)
    assert family.name == name
    assert family.spec_class is spec_class
    assert family_for_spec(spec_class()) is family
    assert family in FAMILIES


def test_family_named_unknown_lists_the_known_ones():
    with pytest.raises(ArchitectureError, match=r"unknown model family 't5' \(known: bert, llama, gpt2, vit\)"):
        family_named("t5")


def test_family_for_spec_of_something_else():
    with pytest.raises(TypeError, match="no family for dict"):
        family_for_spec({"hidden_size": 8})


@pytest.mark.parametrize(
    "model_type, task, name",
    [
        ("bert", "sequence-classification", "bert"),
        ("roberta", "token-classification", "bert"),
        ("xlm-roberta", "sequence-classification", "bert"),
        ("camembert", "sequence-classification", "bert"),
        ("llama", "causal-lm", "llama"),
        ("mistral", "causal-lm", "llama"),
        ("qwen2", "causal-lm", "llama"),
        ("qwen3", "causal-lm", "llama"),
        ("gemma", "causal-lm", "llama"),
        ("gemma3_text", "causal-lm", "llama"),
        ("gpt2", "causal-lm", "gpt2"),
    ],
)
def test_family_of_model_type(model_type, task, name):
    assert family_of({"model_type": model_type}, task).name == name


def test_family_of_unknown_model_type_and_unsupported_task():
    with pytest.raises(ArchitectureError, match=r"model_type 't5' is not supported \(supported: bert, roberta, "):
        family_of({"model_type": "t5"}, "causal-lm")
    with pytest.raises(ArchitectureError, match=r"model_type '' is not supported"):
        family_of({}, "causal-lm")
    with pytest.raises(
        ArchitectureError, match=r"model_type 'gpt2' does not support model.task='sequence-classification' "
    ):
        family_of({"model_type": "gpt2"}, "sequence-classification")
    with pytest.raises(ArchitectureError, match=r"it supports: sequence-classification, token-classification\)"):
        family_of({"model_type": "bert"}, "causal-lm")


def test_bert_spec_from_an_hf_config():
    spec = read(BERT_HF, "token-classification", num_labels=5)
    assert spec == BertSpec(
        family="bert",
        vocab_size=50,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        max_positions=16,
        type_vocab_size=2,
        layer_norm_eps=1e-7,
        dropout_rate=0.3,
        hidden_act="gelu",
        pad_token_id=0,
        task="token-classification",
        num_labels=5,
    )
    # model.dropout_rate >= 0 overrides the checkpoint's; RoBERTa variants are the "roberta" family.
    assert read(BERT_HF, "sequence-classification", dropout=0.0).dropout_rate == 0.0
    assert read({**BERT_HF, "model_type": "xlm-roberta"}, "sequence-classification").family == "roberta"


def test_llama_spec_from_an_hf_config():
    spec = read(LLAMA_HF, "causal-lm", scan=False)
    assert isinstance(spec, LlamaSpec)
    assert (spec.model_type, spec.vocab_size, spec.hidden_size, spec.num_layers) == ("llama", 50, 8, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size) == (2, 1, 4, 16)
    assert spec.rope == RopeSpec(
        theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=32
    )
    assert (spec.max_positions, spec.rms_norm_eps, spec.hidden_act) == (64, 1e-5, "silu")
    assert spec.scan_layers is False
    assert (spec.sliding_window, spec.tie_word_embeddings, spec.qkv_bias, spec.layer_types) == (None, False, False, ())


def test_gemma3_spec_from_an_hf_config():
    spec = read(GEMMA3_HF, "causal-lm")
    assert spec.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert spec.rope == RopeSpec(theta=100000.0, kind="linear", factor=2.0)
    assert spec.local_rope == RopeSpec(theta=1000.0)
    assert (spec.sliding_window, spec.qk_norm, spec.norm_offset, spec.sandwich_norms) == (4, True, True, True)
    assert (spec.tie_word_embeddings, spec.hidden_act) == (True, "gelu_pytorch_tanh")


def test_gpt2_spec_from_an_hf_config():
    spec = read(GPT2_HF, "causal-lm")
    assert spec == GPT2Spec(
        model_type="gpt2",
        vocab_size=50,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,  # n_inner unset: 4 * n_embd
        max_positions=16,
        layer_norm_eps=1e-5,
        hidden_act="gelu_new",
        scale_attn_weights=True,
        tie_word_embeddings=True,
        scan_layers=True,
    )


@pytest.mark.parametrize(
    "hf, task, name",
    [
        (BERT_HF, "sequence-classification", "bert"),
        (LLAMA_HF, "causal-lm", "llama"),
        (GEMMA3_HF, "causal-lm", "llama"),
        (GPT2_HF, "causal-lm", "gpt2"),
    ],
)
def test_spec_from_dict_restores_the_saved_form_exactly(hf, task, name):
    spec = read(hf, task)
    restored = spec_from_dict(name, saved_form(spec))
    assert restored == spec
    assert type(restored) is type(spec)
    if name == "llama":
        assert isinstance(restored.rope, RopeSpec) and isinstance(restored.layer_types, tuple)
    if hf is GEMMA3_HF:
        assert isinstance(restored.local_rope, RopeSpec)  # a `RopeSpec | None` field


def test_spec_from_dict_keeps_defaults_for_fields_an_older_checkpoint_lacks():
    spec = read(LLAMA_HF, "causal-lm")
    saved = saved_form(spec)
    del saved["qk_norm"], saved["local_rope"]
    saved["qk_norm_from_the_future"] = True  # and ignores what it does not know
    restored = spec_from_dict("llama", saved)
    assert restored == spec  # both were the defaults
    with pytest.raises(ArchitectureError, match="unknown model family 'bart'"):
        spec_from_dict("bart", saved)


@pytest.mark.parametrize(
    "hf, model_type, task, class_name",
    [
        (BERT_HF, "bert", "sequence-classification", "BertForSequenceClassification"),
        (BERT_HF, "bert", "token-classification", "BertForTokenClassification"),
        (BERT_HF, "roberta", "sequence-classification", "RobertaForSequenceClassification"),
        (BERT_HF, "xlm-roberta", "token-classification", "XLMRobertaForTokenClassification"),
        (LLAMA_HF, "llama", "causal-lm", "LlamaForCausalLM"),
        (LLAMA_HF, "qwen3", "causal-lm", "Qwen3ForCausalLM"),
        (GEMMA3_HF, "gemma3_text", "causal-lm", "Gemma3ForCausalLM"),
        (GPT2_HF, "gpt2", "causal-lm", "GPT2LMHeadModel"),
    ],
)
def test_hf_class_name_per_task(hf, model_type, task, class_name):
    spec = read({**hf, "model_type": model_type}, task)
    family = family_for_spec(spec)
    assert family.hf_class_name(spec, model_type) == class_name
    assert family.task_of(spec) == task


def test_rows_static_fields():
    bert, llama, gpt2 = (family_named(n) for n in ("bert", "llama", "gpt2"))
    assert bert.tasks == ("sequence-classification", "token-classification") and not bert.is_decoder
    assert llama.is_decoder and gpt2.is_decoder
    assert bert.model_types == ("bert", "roberta", "xlm-roberta", "camembert")
    assert llama.model_types == ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    assert gpt2.model_types == ("gpt2",)
    assert bert.model_class is models.BertModel and llama.model_class is models.LlamaModel
    assert gpt2.model_class is models.GPT2Model
    assert bert.non_architecture == ("task", "num_labels", "dropout_rate")
    assert llama.non_architecture == gpt2.non_architecture == ("scan_layers",)


def test_position_limit():
    assert family_named("bert").position_limit(read(BERT_HF, "sequence-classification")) == 16
    assert family_named("llama").position_limit(read(LLAMA_HF, "causal-lm")) is None  # RoPE: no table
    assert family_named("gpt2").position_limit(read(GPT2_HF, "causal-lm")) == 16  # the learned wpe table


def test_prefixes_and_ignorable_keys():
    bert_spec, llama_spec, gpt2_spec = (
        read(BERT_HF, "sequence-classification"),
        read(LLAMA_HF, "causal-lm"),
        read(GPT2_HF, "causal-lm"),
    )
    bert, llama, gpt2 = (family_for_spec(s) for s in (bert_spec, llama_spec, gpt2_spec))
    assert bert.key_prefix(bert_spec, BERT_HF, {"bert.pooler.dense.bias", "classifier.bias"}) == "bert."
    assert bert.key_prefix(bert_spec, BERT_HF, {"pooler.dense.bias"}) == ""  # a bare encoder (MiniLM)
    assert gpt2.key_prefix(gpt2_spec, GPT2_HF, {"transformer.wte.weight"}) == "transformer."
    assert gpt2.key_prefix(gpt2_spec, GPT2_HF, {"wte.weight"}) == ""
    assert llama.key_prefix(llama_spec, LLAMA_HF, {"model.embed_tokens.weight"}) == ""
    assert bert.export_prefix("bert") == "bert." and bert.export_prefix("camembert") == "roberta."
    assert llama.export_prefix("llama") == "" and gpt2.export_prefix("gpt2") == "transformer."
    assert bert.ignorable_keys(bert_spec) == ()
    assert "lm_head.weight" not in llama.ignorable_keys(llama_spec)  # untied: lm_head is a parameter
    tied = dataclasses.replace(llama_spec, tie_word_embeddings=True)
    assert any(re.fullmatch(p, "lm_head.weight") for p in llama.ignorable_keys(tied))
    assert any(re.fullmatch(p, "transformer.h.1.attn.masked_bias") for p in gpt2.ignorable_keys(gpt2_spec))


def test_hf_entry_through_the_row():
    gpt2_spec = read(GPT2_HF, "causal-lm")
    entry = family_for_spec(gpt2_spec).hf_entry("layers/mlp/c_fc/kernel", gpt2_spec, "transformer.")
    assert entry.keys == ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight") and entry.stacked
    bert_spec = read(BERT_HF, "sequence-classification")
    bert = family_for_spec(bert_spec)
    assert bert.hf_entry("pooler/dense/kernel", bert_spec, "bert.").keys == ("bert.pooler.dense.weight",)
    assert bert.hf_entry("classifier/kernel", bert_spec, "bert.").keys == ("classifier.weight",)  # heads: no prefix
    assert bert.hf_entry("pooler/nothing", bert_spec, "bert.") is None


def param_paths(spec) -> list[str]:
    return [path_str(p) for p, _ in nnx.to_flat_state(build_abstract_model(spec)[1])]


@pytest.mark.parametrize(
    "hf, task, embeddings, layer_1, head",
    [
        (
            BERT_HF,
            "sequence-classification",
            {"embeddings/word/embedding", "embeddings/position/embedding", "embeddings/token_type/embedding"},
            16,
            {"pooler/dense/kernel", "pooler/dense/bias", "classifier/kernel", "classifier/bias"},
        ),
        (LLAMA_HF, "causal-lm", {"embed_tokens"}, 9, {"lm_head/kernel", "norm/scale"}),
        (GPT2_HF, "causal-lm", {"wte", "wpe"}, 12, {"ln_f/scale", "ln_f/bias"}),
    ],
)
def test_part_patterns_name_the_model_parts(hf, task, embeddings, layer_1, head):
    spec = read(hf, task, scan=False)
    family = family_for_spec(spec)
    paths = param_paths(spec)
    taken = lambda pattern: {p for p in paths if re.fullmatch(pattern, p)}
    embeddings = embeddings | ({"embeddings/norm/scale", "embeddings/norm/bias"} if family.name == "bert" else set())
    assert taken(family.embedding_pattern) == embeddings
    in_layer_1 = taken(family.layer_pattern.format(i=1))
    assert len(in_layer_1) == layer_1
    assert all("/1/" in p for p in in_layer_1)
    assert taken(family.layer_pattern.format(i=0)).isdisjoint(in_layer_1)
    assert taken(family.head_pattern) == head


def test_architecture_differences():
    spec = read(BERT_HF, "sequence-classification")
    saved = saved_form(spec)
    assert architecture_differences("bert", saved, spec) == []
    # The head, dropout and layout are not architecture.
    other_head = {**saved, "num_labels": 7, "task": "token-classification", "dropout_rate": 0.0}
    assert architecture_differences("bert", other_head, spec) == []
    assert architecture_differences("bert", {**saved, "hidden_size": 16, "num_layers": 3}, spec) == [
        "hidden_size 16 vs 8",
        "num_layers 3 vs 2",
    ]
    assert architecture_differences("llama", saved, spec) == ["family 'llama' vs 'bert'"]
    llama = read(LLAMA_HF, "causal-lm")
    assert architecture_differences("llama", {**saved_form(llama), "scan_layers": False}, llama) == []


def test_architecture_differences_fill_missing_fields_with_their_defaults():
    llama = read(GEMMA3_HF, "causal-lm")
    saved = saved_form(llama)
    del saved["qkv_bias"]  # default False, as the spec has
    assert architecture_differences("llama", saved, llama) == []
    del saved["qk_norm"]  # default False, but the spec has True
    assert architecture_differences("llama", saved, llama) == ["qk_norm False vs True"]
