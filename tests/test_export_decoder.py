"""export_run of decoder LM runs: plain HF folders (a scanned Llama, an unscanned GPT-2), LoRA adapters folded in
(`merged`, over an fp32 and a bf16 frozen base) and PEFT adapter folders (`adapter`), each loaded by transformers
(and peft) with jaxft's own logits; key sets against the transformers classes; refusals that leave files alone."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from jaxft import cli
from jaxft.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    FreezeConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from jaxft.export import ExportError, export_run, plan_tensors
from jaxft.freeze import train_adapters_only
from jaxft.models import build_abstract_model, family_for_spec, gpt2_hf, llama_hf
from jaxft.run_dir import restore_run
from jaxft.train import train
from tests.fixtures import WORDS, fail_third_write, read_tensors, save_tiny_gpt2, save_tiny_llama, save_tokenizer

VOCAB = 128  # the word-level test tokenizer has ~55 tokens
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,  # HF's 0.02 gives logits too small for a 1e-4 comparison to mean much
)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
ATOL = 1e-4


# ------------------------------------------------------------------------------------------------ helpers


def _save_llama(folder: Path, config_class=LlamaConfig, bf16_exact: bool = False, **overrides) -> Path:
    """A tiny random Llama-family checkpoint with the test tokenizer. `bf16_exact`: every weight rounded to a
    bfloat16 value, so a base frozen in bf16 is the checkpoint itself and a PEFT adapter on it matches to 1e-4."""
    save_tiny_llama(folder, config_class(**{**LLAMA, **overrides}))
    if bf16_exact:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        model.save_pretrained(folder)
    return save_tokenizer(folder)


def _save_gpt2(folder: Path) -> Path:
    save_tiny_gpt2(folder, config=GPT2)
    return save_tokenizer(folder)


def _train(source: Path, run_dir: Path, scan: bool = True, lora: LoraConfig | None = None, **model_kwargs) -> Path:
    """Two steps of causal-LM training on a (2, 2, 2) mesh, with a learning rate that moves LoRA B well off zero."""
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS, 12))} for _ in range(16)]
    data = run_dir.parent / f"{run_dir.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(
        model=ModelConfig(source=str(source), task="causal-lm", scan_layers=scan, **model_kwargs),
        lora=lora or LoraConfig(),
        freeze=FreezeConfig(rules=tuple(train_adapters_only())) if lora else FreezeConfig(),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
        optim=OptimConfig(learning_rate=3e-2, warmup_steps=0, weight_decay=0.0, schedule="constant"),
        train=TrainConfig(max_steps=2, batch_size=8, eval_every_steps=0, eval_batch_size=8),
        data=DataConfig(dataset="files", train_files=(str(data),), max_length=32),  # no eval files: no eval
        checkpoint=CheckpointConfig(every_steps=0),
    )
    train(cfg, run_dir)
    return run_dir


IDS = np.random.default_rng(1).integers(3, VOCAB, (2, 10)).astype(np.int64)


def _jaxft_logits(run_dir: Path) -> np.ndarray:
    run = restore_run(run_dir)
    graphdef, params = run.graphdef, run.params
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(IDS, jnp.int32)))


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits.float().numpy()


def _hf_logits(folder: Path) -> np.ndarray:
    """Logits of transformers' own class for the export; fails on any missing, unexpected or mis-shaped key."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return _torch_logits(model)


def _peft_logits(source: Path, adapter: Path) -> np.ndarray:
    """Logits of the pretrained model with the exported adapter loaded by peft; every saved tensor must land."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert loaded.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(loaded[k], saved[k].astype(np.float32), err_msg=k)
    return _torch_logits(model)


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return read_tensors(folder)


def _dtypes(path: Path) -> set[str]:
    from safetensors.numpy import load_file

    return {str(v.dtype) for v in load_file(str(path)).values()}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _save_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def llama_run(tiny_llama, tmp_path_factory, data_dir) -> Path:
    return _train(tiny_llama, tmp_path_factory.mktemp("llama_run") / "run", scan=True)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2") / "model"
    return _save_llama(folder, Qwen2Config, bf16_exact=True, tie_word_embeddings=True)  # q/k/v biases, tied head


@pytest.fixture(scope="module")
def qwen2_lora_run(tiny_qwen2, tmp_path_factory, data_dir) -> Path:
    """Unscanned, its frozen base stored in bf16; adapters on the attention and one MLP projection."""
    lora = LoraConfig(rank=4, alpha=8.0, targets=(r".*(q|k|v|o)_proj", r".*down_proj"))
    run_dir = tmp_path_factory.mktemp("qwen2_lora") / "run"
    return _train(tiny_qwen2, run_dir, scan=False, lora=lora, frozen_dtype="bfloat16")


@pytest.fixture(scope="module")
def gpt2_lora_run(tiny_gpt2, tmp_path_factory, data_dir) -> Path:
    lora = LoraConfig(rank=4, alpha=8.0, targets=(r".*c_attn", r".*mlp/c_fc"))
    return _train(tiny_gpt2, tmp_path_factory.mktemp("gpt2_lora") / "run", scan=True, lora=lora)


# ------------------------------------------------------------------------------------------------ plain


def test_scanned_llama_export_loads_in_transformers_with_jaxft_logits(llama_run, tiny_llama, tmp_path):
    out = export_run(llama_run, tmp_path / "export", max_shard_bytes=40_000)  # sharded: one layer per file
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes(), name
    np.testing.assert_allclose(_hf_logits(out), _jaxft_logits(llama_run), atol=ATOL)


def test_unscanned_gpt2_export_loads_in_transformers_with_jaxft_logits(tiny_gpt2, tmp_path, data_dir):
    run = _train(tiny_gpt2, tmp_path / "run", scan=False)
    out = export_run(run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    weights = _weights(out)
    assert "lm_head.weight" not in weights and "transformer.h.1.attn.c_attn.weight" in weights  # tied to wte
    np.testing.assert_allclose(_hf_logits(out), _jaxft_logits(run), atol=ATOL)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "gpt2"])
def test_planned_tensors_are_exactly_the_transformers_class_state_dict(model_type, scan):
    """Every decoder family, tied and untied, scanned and not: keys and shapes against the real class (meta device)."""
    if model_type == "gpt2":
        config = AutoConfig.for_model(model_type, **GPT2)
        spec = gpt2_hf.spec_from_hf_config(config.to_dict(), scan_layers=scan)
    else:
        extra = {"qwen2": dict(tie_word_embeddings=True), "qwen3": dict(head_dim=16, attention_bias=True)}
        config = AutoConfig.for_model(model_type, **LLAMA, **extra.get(model_type, {}))
        spec = llama_hf.spec_from_hf_config(config.to_dict(), scan_layers=scan)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        del expected[next(k for k in expected if k.endswith("lm_head.weight"))]  # tied: saved once, as the input
    _, abstract = build_abstract_model(spec)
    tensors = plan_tensors(abstract, spec, model_type, np.dtype(np.float32), Path("run"))
    assert {t.key: t.shape for t in tensors} == expected
    assert family_for_spec(spec).hf_class_name(spec, model_type) == type(model).__name__


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_merged_over_a_bf16_frozen_base_equals_jaxft(qwen2_lora_run, tiny_qwen2, tmp_path):
    run = restore_run(qwen2_lora_run)
    params = run.params
    assert params["layers"][1]["self_attn"]["q_proj"]["kernel"].get_value().dtype == jnp.bfloat16
    assert np.abs(np.asarray(params["layers"][1]["mlp"]["down_proj"]["lora_b"].get_value())).max() > 1e-2
    out = export_run(qwen2_lora_run, tmp_path / "merged", merged=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    weights = _weights(out)
    assert "lm_head.weight" not in weights and {str(v.dtype) for v in weights.values()} == {"float32"}
    logits = _jaxft_logits(qwen2_lora_run)
    assert np.abs(logits - _torch_logits(AutoModelForCausalLM.from_pretrained(tiny_qwen2))).max() > 1e-2  # trained
    np.testing.assert_allclose(_hf_logits(out), logits, atol=ATOL)


def test_lora_adapter_export_loads_in_peft_with_jaxft_logits(qwen2_lora_run, tiny_qwen2, tmp_path):
    out = export_run(qwen2_lora_run, tmp_path / "adapter", adapter=True)
    assert sorted(p.name for p in out.iterdir() if "token" not in p.name) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8, False)
    assert config["base_model_name_or_path"] == str(tiny_qwen2.resolve())
    assert len(config["target_modules"]) == 2 * 5 and "model.layers.1.mlp.down_proj" in config["target_modules"]
    np.testing.assert_allclose(_peft_logits(tiny_qwen2, out), _jaxft_logits(qwen2_lora_run), atol=ATOL)
    half = export_run(qwen2_lora_run, tmp_path / "bf16", adapter=True, dtype="bfloat16")
    assert _dtypes(half / "adapter_model.safetensors") == {"bfloat16"}


def test_gpt2_lora_adapter_and_merged_exports(gpt2_lora_run, tiny_gpt2, tmp_path):
    """Scanned Conv1D layers and the fused c_attn [E, 3, N, H]: B [r, 3, N, H] flattens to HF's q, k, v outputs."""
    logits = _jaxft_logits(gpt2_lora_run)
    assert np.abs(logits - _torch_logits(AutoModelForCausalLM.from_pretrained(tiny_gpt2))).max() > 1e-2  # trained
    adapter = export_run(gpt2_lora_run, tmp_path / "adapter", adapter=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    modules = [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    assert sorted(config["target_modules"]) == modules
    np.testing.assert_allclose(_peft_logits(tiny_gpt2, adapter), logits, atol=ATOL)
    merged = export_run(gpt2_lora_run, tmp_path / "merged", merged=True)
    np.testing.assert_allclose(_hf_logits(merged), logits, atol=ATOL)


# ------------------------------------------------------------------------------------------------ refusals


def test_lora_run_needs_merged_or_adapter_and_plain_runs_refuse_both(llama_run, qwen2_lora_run, tmp_path):
    with pytest.raises(ExportError, match="has LoRA adapters.*--merged.*--adapter"):
        export_run(qwen2_lora_run, tmp_path / "out")
    with pytest.raises(ExportError, match="--merged exports LoRA adapters, and this run has none"):
        export_run(llama_run, tmp_path / "out", merged=True)
    with pytest.raises(ExportError, match="--adapter exports LoRA adapters"):
        export_run(llama_run, tmp_path / "out", adapter=True)
    with pytest.raises(ExportError, match="exclude each other"):
        export_run(qwen2_lora_run, tmp_path / "out", merged=True, adapter=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_adapter_of_a_run_that_also_trained_base_weights_is_refused(qwen2_lora_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    meta = json.loads((qwen2_lora_run / "run.json").read_text())
    meta["trainable_paths"] += ["norm/scale"]  # as if the freeze rules had also trained the final norm
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="also trained norm/scale; export it with --merged"):
        export_run(run, tmp_path / "out", adapter=True)
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_leaves_no_folder(qwen2_lora_run, tmp_path, monkeypatch):
    calls = fail_third_write(monkeypatch)
    for kwargs in (dict(merged=True), dict(adapter=True)):
        calls.clear()
        with pytest.raises(ExportError, match="No space left"):
            export_run(qwen2_lora_run, tmp_path / "out", **kwargs)
        assert not list(tmp_path.iterdir())  # neither the folder nor its temporary sibling


def test_non_empty_out_dir_is_left_untouched(qwen2_lora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for kwargs in (dict(merged=True), dict(adapter=True)):
        with pytest.raises(ExportError, match="not empty"):
            export_run(qwen2_lora_run, out, **kwargs)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial sibling left behind


def test_cli_lora_export_errors_are_one_line_and_adapter_works(qwen2_lora_run, tmp_path, capsys):
    assert cli.main(["export", str(qwen2_lora_run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxft: error: ") and "--merged" in err[0], err
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", str(qwen2_lora_run), str(tmp_path / "out"), "--adapter", "--dtype", "float16"]) == 0
    assert "PEFT adapter" in capsys.readouterr().out
    assert _dtypes(tmp_path / "out" / "adapter_model.safetensors") == {"float16"}
