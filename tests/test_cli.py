"""The CLI end to end on the demo config (tiny steps), and every user-caused error as one line, exit 2."""

import json
import re
import shutil

import pytest

from jaxft.config import load_config
from jaxft.plan import describe_plan
from tests.fixtures import (
    DEMO,
    ROOT,
    one_line_error,
    run_cli,
    save_llama_family,
    save_tiny_gpt2,
    save_tiny_vit,
    write_image_folder,
)

TINY = [
    "train.max_steps=4",
    "train.batch_size=16",
    "data.max_length=32",
    "train.eval_every_steps=2",
    "checkpoint.every_steps=2",
    "train.log_every_steps=1",
    "train.eval_batch_size=64",
]


def test_demo_config_end_to_end_then_predict_and_plan(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    r = run_cli("train", DEMO, "--run-dir", str(run_dir), *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test accuracy:" in r.stdout
    assert "Traceback" not in r.stderr
    assert "freeze plan" in r.stderr and "encoder/layers/(0|1|2)/.*" in r.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2, 3, 4]
    for rec in records:
        assert {"step", "loss", "learning_rate", "tokens_per_sec"} <= set(rec)
    evals = [rec for rec in records if "eval_accuracy" in rec]
    assert [rec["step"] for rec in evals] == [2, 4]
    # The eval covers the bundled test split once (160 reviews); accuracy is a count of them.
    assert evals[-1]["eval_examples"] == 160
    correct = evals[-1]["eval_accuracy"] * 160
    assert abs(correct - round(correct)) < 1e-6, evals[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # How the step ran: model.compute_dtype=auto is fp32 on a CPU; attention is XLA's own ops here.
    execution = json.loads((run_dir / "run.json").read_text())["execution"]
    assert execution == {"platform": "cpu", "compute_dtype": "float32", "attention": "xla"}

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "Great product, works perfectly."}\n{"text": "Broke after a day.", "id": 7}\n')
    out = tmp_path / "out.jsonl"
    r = run_cli("predict", str(run_dir), "--input", str(inp), "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["id"] == 7
    for row in rows:
        assert row["label"] in ("negative", "positive")
        assert len(row["probs"]) == 2 and abs(sum(row["probs"]) - 1) < 1e-5

    r = run_cli("plan", DEMO, "mesh.data=2", "mesh.fsdp=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: data=2 fsdp=4 tensor=1" in r.stdout
    assert "P('fsdp', 'tensor')" in r.stdout or "P('fsdp'," in r.stdout
    assert "optimizer" in r.stdout and "frozen" in r.stdout

    # A second train into the same run dir resumes it: finished, so nothing is written over; a config
    # that changes the result is refused and names the difference.
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    r = run_cli("train", DEMO, "--run-dir", str(run_dir), *TINY)
    assert r.returncode == 0 and "run already complete at step 4" in r.stdout, r.stderr[-3000:]
    r = run_cli("train", DEMO, "--run-dir", str(run_dir), *TINY, "optim.learning_rate=0.5")
    assert r.returncode == 2 and "optim.learning_rate (0.0001 -> 0.5)" in r.stderr, r.stderr[-3000:]
    assert "--allow-config-change" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def _one_line_error(args, capsys, expect):
    line = one_line_error(args, capsys)
    assert expect in line, line
    return line


def test_unknown_key_and_wrong_type(capsys):
    _one_line_error(["train", DEMO, "train.bogus=1"], capsys, "unknown config key 'train.bogus'")
    _one_line_error(["train", DEMO, "train.max_steps=abc"], capsys, "train.max_steps: expected an integer")
    _one_line_error(["train", DEMO, "optim.name=lion"], capsys, "optim.name: 'lion' is not one of")
    _one_line_error(["train", DEMO, "nosuchsection.x=1"], capsys, "unknown config key")
    _one_line_error(["train", "configs/nope.py"], capsys, "does not exist")


def test_checkpoint_path_that_does_not_exist(tmp_path, capsys, data_dir):
    _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), "model.source=/no/such/ckpt"],
        capsys,
        "/no/such/ckpt: checkpoint path does not exist",
    )
    assert not (tmp_path / "r").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), "model.source=someorg/some-bert"],
        capsys,
        "hub is unreachable",
    )


def test_corrupted_safetensors_names_the_file(tmp_path, capsys, tiny_bert, data_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), f"model.source={bad}"], capsys, "model.safetensors"
    )
    assert "truncated" in line or "corrupted" in line
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), f"model.source={bad}"], capsys, "model.safetensors"
    )


def test_corrupted_safetensors_through_python_api(tmp_path, tiny_bert):
    import jaxft
    from jaxft.load import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: .*truncated"):
        jaxft.load(str(bad))


def test_checkpoint_of_another_architecture(tmp_path, capsys, tiny_bert, data_dir):
    other = tmp_path / "t5"
    shutil.copytree(tiny_bert, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "t5"
    (other / "config.json").write_text(json.dumps(cfg))
    _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), f"model.source={other}"],
        capsys,
        "model_type 't5' is not supported",
    )
    cfg["model_type"] = "llama"  # a decoder asked to classify
    (other / "config.json").write_text(json.dumps(cfg))
    _one_line_error(
        ["train", DEMO, "--run-dir", str(tmp_path / "r"), f"model.source={other}"],
        capsys,
        "model_type 'llama' does not support model.task='sequence-classification'",
    )
    assert not (tmp_path / "r").exists()


def test_mis_shaped_and_missing_keys_are_listed_together(tmp_path, tiny_bert):
    from safetensors.numpy import load_file, save_file

    import jaxft
    from jaxft.load import CheckpointError

    bad = tmp_path / "shapes"
    shutil.copytree(tiny_bert, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["bert.encoder.layer.0.intermediate.dense.weight"] = tensors[
        "bert.encoder.layer.0.intermediate.dense.weight"
    ][:10]
    del tensors["bert.pooler.dense.bias"]
    tensors["bert.extra.weight"] = tensors["bert.pooler.dense.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        jaxft.load(str(bad))
    msg = str(e.value)
    assert "mis-shaped bert.encoder.layer.0.intermediate.dense.weight: expected [64, 32], found [10, 32]" in msg
    assert "missing bert.pooler.dense.bias" in msg
    assert "unexpected bert.extra.weight" in msg


def test_empty_dataset_label_not_in_set_and_indivisible_batch(tmp_path, capsys, data_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["train", DEMO, "--run-dir", str(tmp_path / "r")]
    _one_line_error(base + ["data.dataset=files", f"data.train_files={empty}"], capsys, "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "hmm", "label": "neutral"}\n')
    _one_line_error(
        base + ["data.dataset=files", f"data.train_files={bad}", "data.label_names=negative,positive"],
        capsys,
        "label 'neutral' is not in the label set",
    )
    _one_line_error(base + ["train.batch_size=12"], capsys, "train.batch_size: 12")
    assert not (tmp_path / "r").exists()


def test_predict_errors(tmp_path, capsys):
    _one_line_error(
        ["predict", str(tmp_path), "--input", "x.jsonl", "--output", "y.jsonl"], capsys, "not a jaxft run dir"
    )


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    r = run_cli("train", DEMO, "train.max_steps=-3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "jaxft: error: train.max_steps: must be > 0, got -3"
    assert "Traceback" not in r.stderr


# Each shipped config, on a model of the family it is written for (minilm is bundled; the hub ids of the decoder
# configs become tiny local checkpoints), and the parameters its freeze rules leave trainable.
SHIPPED = {
    "base": (None, r".*"),
    "tiny": (None, r".*"),
    "minilm_sentiment": (None, r"encoder/layers/[345]/.*|pooler/.*|classifier/.*"),
    "gpt2_clm": ("gpt2", r".*"),
    "llama_sft_lora": ("qwen2", r"layers/\d+/self_attn/(q|k|v|o)_proj/lora_(a|b)"),  # per layer on a CPU
    "vit_image_classification": ("vit", r".*"),
}


def test_every_shipped_config_is_in_the_table():
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.py")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_plans(name, tmp_path, data_dir):
    family, trainable = SHIPPED[name]
    overrides = []
    if family == "gpt2":
        overrides = [f"model.source={save_tiny_gpt2(tmp_path / 'gpt2')}"]
    elif family == "qwen2":
        overrides = [f"model.source={save_llama_family(tmp_path / 'qwen2', 'qwen2')}"]
    elif family == "vit":
        images = write_image_folder(tmp_path / "images", per_class=2)
        overrides = [f"model.source={save_tiny_vit(tmp_path / 'vit')}", f"data.train_dir={images}", "data.eval_dir="]
    table = describe_plan(load_config(ROOT / "configs" / f"{name}.py", overrides))
    rows = [line.split() for line in table.splitlines() if re.match(r"\S+ +\[", line)]
    assert rows, table
    for row in rows:
        expected = "train" if re.fullmatch(trainable, row[0]) else "frozen"
        assert row[-3].startswith(expected), (name, row)
