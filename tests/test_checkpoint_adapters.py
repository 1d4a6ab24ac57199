"""Adapter-only checkpoints (checkpoint.save_frozen=false): the checkpoint holds the LoRA adapters and their
optimizer state, the frozen base is read back from the recorded pretrained files, which must be unchanged, and
the restored model is exactly the one a full checkpoint gives."""

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from jaxft import cli
from jaxft.checkpoint import checkpoint_dir
from tests.fixtures import SFT, SFT_ARGS, run_params, save_tiny_chat_model, train_in_process

ARGS = [a for a in SFT_ARGS if not a.startswith(("train.max_steps", "train.eval_every", "checkpoint.every"))]
ARGS += ["train.max_steps=2", "train.eval_every_steps=0", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("adapter_ckpt") / "qwen2")


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory, data_dir) -> dict[str, Path]:
    """The same 2-step LoRA run saved with and without its frozen base."""
    root = tmp_path_factory.mktemp("adapter_runs")
    out = {}
    for name, flag in (("adapter", "false"), ("full", "true")):
        source = shutil.copytree(base, root / f"base_{name}")  # each run may damage its own copy
        train_in_process(SFT, root / name, f"model.source={source}", f"checkpoint.save_frozen={flag}", *ARGS)
        out[name] = root / name
    return out


def _saved_tree(run_dir: Path) -> dict:
    return ocp.PyTreeCheckpointer().metadata(checkpoint_dir(run_dir) / "2" / "state").item_metadata.tree


def _array_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def test_adapter_checkpoint_holds_no_frozen_tensor_and_restores_the_same_model(runs):
    tree, full_tree = _saved_tree(runs["adapter"]), _saved_tree(runs["full"])
    assert "frozen" not in tree and tree["trainable"], sorted(tree)
    assert "embed_tokens" in full_tree["frozen"]
    a, b = run_params(runs["adapter"]), run_params(runs["full"])
    frozen_bytes = sum(v.nbytes for k, v in a.items() if "lora_" not in k)
    # Exactly the frozen base (bf16) is what the adapter-only checkpoint leaves out.
    assert _array_bytes(full_tree) - _array_bytes(tree) == frozen_bytes > 0
    meta = json.loads((checkpoint_dir(runs["adapter"]) / "2" / "meta" / "metadata").read_text())
    assert meta["frozen_saved"] is False and meta["source"]["files"]  # the base: path and sha256
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_changed_or_missing_base_is_a_one_line_error(runs, capsys):
    run = runs["adapter"]
    source = Path(json.loads((run / "run.json").read_text())["source"]["path"])
    weights = source / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrained files changed" in err[0] and "model.safetensors" in err[0], err
    shutil.rmtree(source)
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is gone" in err[0], err
    # The full checkpoint never needed its base files.
    assert cli.main(["eval", str(runs["full"])]) == 0


def test_a_frozen_parameter_that_may_be_initialised_fresh_is_refused(base, tmp_path, capsys):
    args = [f"model.source={base}", "checkpoint.save_frozen=false", "load.new_params=.*norm/scale", *ARGS]
    assert cli.main(["train", SFT, "--run-dir", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.save_frozen=false" in err[0] and "norm/scale" in err[0], err
    assert not (tmp_path / "r").exists()
