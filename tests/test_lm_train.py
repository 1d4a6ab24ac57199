"""Decoder fine-tuning end to end through the CLI with the shipped configs on tiny models: LoRA SFT of a Qwen2-style
model (chat template, packing, adapters only, frozen base in bf16) and a full GPT-2 causal-LM fine-tune on raw text.
Loss and perplexity go down, only the adapters change, and a run resumed from a mid-run checkpoint ends bitwise
equal to the uninterrupted one."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft import cli
from jaxft.checkpoint import checkpoint_dir
from jaxft.run_dir import restore_run
from tests import test_gpt2_parity as gpt2_tests
from tests import test_llama_parity as llama_tests
from tests.conftest import TOKENIZER_FILES, minilm_path
from tests.test_lm_data import CHATML, _save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT = str(ROOT / "configs" / "llama_sft_lora.py")
CLM = str(ROOT / "configs" / "gpt2_clm.py")
SFT_ARGS = [
    "train.max_steps=6",
    "train.batch_size=8",
    "train.eval_every_steps=3",
    "train.log_every_steps=1",
    "checkpoint.every_steps=3",
    "data.max_length=96",
    "optim.learning_rate=1e-2",
    "optim.warmup_steps=0",
    "lora.rank=4",
    "mesh.data=4",
    "mesh.fsdp=2",
]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    make, _ = llama_tests.FAMILIES["qwen2"]
    folder = llama_tests.save_tiny(tmp_path_factory.mktemp("sft") / "qwen2", make())
    return _save_tokenizer(folder, CHATML)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params(run_dir: Path) -> dict[str, np.ndarray]:
    run = restore_run(run_dir)
    p = run.params
    return {"/".join(map(str, k)): np.asarray(jax.device_get(v.get_value())) for k, v in p.flat_state()}


def train(config: str, run_dir: Path, *args: str) -> None:
    assert cli.main(["train", config, "--run-dir", str(run_dir), *args]) == 0


@pytest.fixture(scope="module")
def sft_run(tiny_qwen, tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("sft_run") / "run"
    train(SFT, run_dir, f"model.source={tiny_qwen}", *SFT_ARGS)
    return run_dir


def test_lora_sft_trains_adapters_only_and_loss_drops(sft_run, tiny_qwen):
    rows = records(sft_run)
    evals = [r for r in rows if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert np.isclose(evals[-1]["eval_perplexity"], np.exp(evals[-1]["eval_loss"]), rtol=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    run = json.loads((sft_run / "run.json").read_text())
    assert run["family"] == "llama" and all("lora_" in p for p in run["trainable_paths"])
    trained = params(sft_run)
    base = llama_tests.read_tensors(tiny_qwen)
    # The frozen base is exactly the checkpoint (rounded to bf16 on load); the adapters moved away from B = 0.
    embed = base["model.embed_tokens.weight"]
    np.testing.assert_array_equal(trained["embed_tokens"], embed.astype(trained["embed_tokens"].dtype))
    assert trained["embed_tokens"].dtype.name == "bfloat16"
    assert np.abs(trained["layers/self_attn/q_proj/lora_b"]).max() > 0


def test_lora_sft_resumed_from_a_mid_run_checkpoint_is_bitwise_equal(sft_run, tiny_qwen, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(sft_run, resumed)
    shutil.rmtree(checkpoint_dir(resumed) / "6")  # as if the run had died after its step-3 save
    train(SFT, resumed, f"model.source={tiny_qwen}", *SFT_ARGS)
    a, b = params(sft_run), params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(sft_run)]


def test_gpt2_full_fine_tune_on_raw_text(tmp_path, data_dir):
    model = gpt2_tests.save_tiny(tmp_path / "gpt2", config=dict(vocab_size=30522, n_embd=32, n_layer=2, n_head=2))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, model / name)
    run_dir = tmp_path / "run"
    args = ["train.max_steps=4", "train.eval_every_steps=4", "data.max_length=32", "optim.learning_rate=1e-3"]
    args += ["optim.warmup_steps=0", "checkpoint.every_steps=4", "model.scan_layers=false"]
    train(CLM, run_dir, f"model.source={model}", *args)
    rows = records(run_dir)
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
    at_6 = next(r for r in records(sft_run) if r["step"] == 6 and "eval_loss" in r)
    assert np.isclose(record["eval_loss"], at_6["eval_loss"], rtol=1e-5)
    assert np.isclose(record["eval_perplexity"], at_6["eval_perplexity"], rtol=1e-5)
    assert "eval_perplexity=" in out and "tokens)" in out
