"""Decoder fine-tuning end to end through the CLI with the shipped configs on tiny models: LoRA SFT of a Qwen2-style
model (chat template, packing, adapters only, frozen base in bf16) and a full GPT-2 causal-LM fine-tune on raw text.
Loss and perplexity go down, only the adapters change, and a run resumed from a mid-run checkpoint ends bitwise
equal to the uninterrupted one."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxft import cli
from jaxft.checkpoint import checkpoint_dir
from tests.fixtures import (
    CLM,
    SFT,
    SFT_ARGS,
    copy_minilm_tokenizer,
    metrics_records,
    read_tensors,
    run_params,
    save_tiny_chat_model,
    save_tiny_gpt2,
    train_in_process,
)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("sft") / "qwen2")


@pytest.fixture(scope="module")
def sft_run(tiny_qwen, tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("sft_run") / "run"
    train_in_process(SFT, run_dir, f"model.source={tiny_qwen}", *SFT_ARGS)
    return run_dir


def test_lora_sft_trains_adapters_only_and_loss_drops(sft_run, tiny_qwen):
    rows = metrics_records(sft_run)
    evals = [r for r in rows if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert np.isclose(evals[-1]["eval_perplexity"], np.exp(evals[-1]["eval_loss"]), rtol=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    run = json.loads((sft_run / "run.json").read_text())
    assert run["family"] == "llama" and all("lora_" in p for p in run["trainable_paths"])
    trained = run_params(sft_run)
    base = read_tensors(tiny_qwen)
    # The frozen base is exactly the checkpoint (rounded to bf16 on load); the adapters moved away from B = 0.
    embed = base["model.embed_tokens.weight"]
    np.testing.assert_array_equal(trained["embed_tokens"], embed.astype(trained["embed_tokens"].dtype))
    assert trained["embed_tokens"].dtype.name == "bfloat16"
    assert run["spec"]["scan_layers"] is False  # model.scan_layers=auto on a CPU: one module per layer
    assert all(
        np.abs(trained[f"layers/{i}/self_attn/q_proj/lora_b"]).max() > 0 for i in range(run["spec"]["num_layers"])
    )


def test_lora_sft_resumed_from_a_mid_run_checkpoint_is_bitwise_equal(sft_run, tiny_qwen, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(sft_run, resumed)
    shutil.rmtree(checkpoint_dir(resumed) / "6")  # as if the run had died after its step-3 save
    train_in_process(SFT, resumed, f"model.source={tiny_qwen}", *SFT_ARGS)
    a, b = run_params(sft_run), run_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [r["loss"] for r in metrics_records(resumed)] == [r["loss"] for r in metrics_records(sft_run)]


def test_gpt2_full_fine_tune_on_raw_text(tmp_path, data_dir):
    model = save_tiny_gpt2(tmp_path / "gpt2", config=dict(vocab_size=30522, n_embd=32, n_layer=2, n_head=2))
    copy_minilm_tokenizer(model)
    run_dir = tmp_path / "run"
    args = ["train.max_steps=4", "train.eval_every_steps=4", "data.max_length=32", "optim.learning_rate=1e-3"]
    args += ["optim.warmup_steps=0", "checkpoint.every_steps=4", "model.scan_layers=false"]
    train_in_process(CLM, run_dir, f"model.source={model}", *args)
    rows = metrics_records(run_dir)
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["eval_perplexity"])
    trained = json.loads((run_dir / "run.json").read_text())["trainable_paths"]
    assert "wte" in trained and "layers/0/attn/c_attn/kernel" in trained


def test_causal_lm_bad_inputs_are_one_line(tiny_qwen, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code = cli.main(
        ["train", SFT, "--run-dir", str(tmp_path / "r"), f"model.source={tiny_qwen}", f"data.train_files={bad}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no assistant turn" in err[0], err
    code = cli.main(["train", SFT, "--run-dir", str(tmp_path / "r"), f"model.source={tiny_qwen}", "lora.targets=.*qkv"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "lora.targets" in err[-1] and "'.*qkv'" in err[-1], err


def test_eval_of_a_saved_lm_step_matches_the_training_eval(sft_run, capsys):
    assert cli.main(["eval", str(sft_run), "--step", "6"]) == 0
    out = capsys.readouterr().out
    record = json.loads((sft_run / "eval-6.json").read_text())
    at_6 = next(r for r in metrics_records(sft_run) if r["step"] == 6 and "eval_loss" in r)
    assert np.isclose(record["eval_loss"], at_6["eval_loss"], rtol=1e-5)
    assert np.isclose(record["eval_perplexity"], at_6["eval_perplexity"], rtol=1e-5)
    assert "eval_perplexity=" in out and "tokens)" in out
