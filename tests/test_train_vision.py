"""Image classification end to end through the CLI: a tiny ViT saved by transformers, fine-tuned on image folders the
test generates (classes told apart by colour), reaches accuracy well above chance; a resumed run ends bitwise equal;
predict, eval (top-5 with 6 classes) and export agree with transformers' own processor and model; bad images,
bad folders and bad predict input fail in one line; freeze rules, layer-wise LR decay and gradual unfreezing
work on ViT paths; plan compiles the ViT step for a TPU slice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxft import cli
from tests.fixtures import (
    metrics_records,
    one_line_error,
    run_params,
    save_tiny_vit,
    train_in_process,
    write_image_folder,
    write_vit_config,
)

CLASSES = ("blue", "green", "purple", "red", "white", "yellow")  # 6: top-5 accuracy means something


@pytest.fixture(scope="module")
def vision(tmp_path_factory, data_dir):
    """One 12-step fine-tune of a tiny ViT (6 classes, 16 images each, 32 px): an eval and a checkpoint every 4."""
    tmp = tmp_path_factory.mktemp("vision")
    model = save_tiny_vit(tmp / "vit", num_labels=3)  # the recipe re-initialises the head at the run's 6 classes
    train = write_image_folder(tmp / "train", CLASSES, per_class=16)
    val = write_image_folder(tmp / "val", CLASSES, per_class=4, seed=1)
    config = write_vit_config(tmp / "config.py", model, train, val)
    run_dir = tmp / "run"
    train_in_process(config, run_dir)
    return {"tmp": tmp, "model": model, "train": train, "val": val, "config": config, "run": run_dir}


def test_a_tiny_vit_learns_the_images_well_above_chance(vision):
    records = metrics_records(vision["run"])
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals[-1]["eval_accuracy"] >= 0.75, evals  # chance is 1/6
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0.0 <= evals[-1]["eval_accuracy"] <= evals[-1]["eval_top5_accuracy"] <= 1.0
    steps = [r for r in records if "loss" in r]
    assert all(r["images_per_sec"] > 0 and "padding_fraction" not in r for r in steps)
    meta = json.loads((vision["run"] / "run.json").read_text())
    assert meta["label_names"] == list(CLASSES)
    assert meta["images"] == {"size": 32, "resize": 36, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def test_the_new_head_starts_at_zero(vision, tmp_path):
    # load.zero_init_params: the recipe's head is all zeros before the first step, so step 1's loss is log(6).
    first = metrics_records(vision["run"])[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(np.log(len(CLASSES)), abs=1e-5)


def test_resume_from_a_checkpoint_ends_bitwise_equal(vision, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(vision["run"], run_dir)
    for step in (8, 12):  # back to the checkpoint of step 4: steps 5-12 run again, the data iterator restored
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    train_in_process(vision["config"], run_dir)
    resumed, reference = run_params(run_dir, 12), run_params(vision["run"], 12)
    assert resumed.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
    assert [r["loss"] for r in metrics_records(run_dir)] == [r["loss"] for r in metrics_records(vision["run"])]


def test_eval_reports_top5_and_macro_f1(vision):
    assert cli.main(["eval", str(vision["run"])]) == 0
    record = json.loads((vision["run"] / "eval-12.json").read_text())
    last = [r for r in metrics_records(vision["run"]) if "eval_accuracy" in r][-1]
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy", "eval_macro_f1"):
        assert record[key] == pytest.approx(last[key], abs=1e-6), key
    assert record["eval_examples"] == 4 * len(CLASSES)


def test_export_reproduces_predict_through_transformers(vision, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out, predictions = tmp_path / "export", tmp_path / "pred.jsonl"
    assert cli.main(["predict", str(vision["run"]), "--input", str(vision["val"]), "--output", str(predictions)]) == 0
    assert cli.main(["export", str(vision["run"]), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 4 * len(CLASSES)
    assert sum(r["label"] == Path(r["image"]).parent.name for r in rows) >= 0.75 * len(rows)
    processor = AutoImageProcessor.from_pretrained(out)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == dict(enumerate(CLASSES))
    with torch.no_grad():
        inputs = processor(images=[Image.open(r["image"]) for r in rows], return_tensors="pt")
        probs = model(**inputs).logits.softmax(-1).numpy()
    np.testing.assert_allclose(probs, np.array([r["probs"] for r in rows]), atol=1e-4)
    assert [model.config.id2label[int(i)] for i in probs.argmax(-1)] == [r["label"] for r in rows]


def test_predict_reads_jsonl_with_relative_paths(vision, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(vision["val"] / "red", images)
    lines = [{"image": f"images/{p.name}", "id": i} for i, p in enumerate(sorted(images.iterdir()))]
    listing = tmp_path / "images.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out.jsonl"
    assert (
        cli.main(["predict", str(vision["run"]), "--input", str(listing), "--output", str(out), "--batch-size", "3"])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in lines]
    assert all(len(r["probs"]) == len(CLASSES) and abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)


def test_predict_bad_input_is_one_line(vision, tmp_path, capsys):
    run = str(vision["run"])
    listing = tmp_path / "in.jsonl"
    listing.write_text(json.dumps({"image": "nope.png"}) + "\n")
    line = one_line_error(["predict", run, "--input", listing, "--output", tmp_path / "o.jsonl"], capsys)
    assert "in.jsonl:1" in line and "nope.png does not exist" in line
    listing.write_text(json.dumps({"text": "a picture"}) + "\n")
    assert '"image" field' in one_line_error(["predict", run, "--input", listing, "--output", tmp_path / "o"], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    good = sorted((vision["val"] / "red").glob("*.png"))[0]
    (broken / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    line = one_line_error(["predict", run, "--input", broken, "--output", tmp_path / "o.jsonl"], capsys)
    assert "cut.png: unreadable image" in line
    assert not (tmp_path / "o.jsonl").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in one_line_error(["predict", run, "--input", empty, "--output", tmp_path / "o"], capsys)


def test_bad_images_stop_with_the_file_or_are_skipped_and_counted(vision, tmp_path, capsys, caplog):
    train = tmp_path / "train"
    shutil.copytree(vision["train"], train)
    good = sorted((train / "red").glob("*.jpg"))[0]
    (train / "red" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    config = write_vit_config(tmp_path / "config.py", vision["model"], train, train={"max_steps": 2})
    line = one_line_error(["train", config, "--run-dir", tmp_path / "run"], capsys)
    assert f"{train / 'red' / 'truncated.jpg'}: unreadable image" in line and "data.bad_images=skip" in line
    assert not (tmp_path / "run").exists()  # nothing written
    train_in_process(config, tmp_path / "run", "data.bad_images=skip")
    assert "left out 1 unreadable image(s)" in caplog.text and "truncated.jpg" in caplog.text
    assert [r["step"] for r in metrics_records(tmp_path / "run")] == [1, 2]


def test_bad_image_folders_are_one_line_errors(vision, tmp_path, capsys):
    one_class = write_image_folder(tmp_path / "one", ("red",), per_class=2)
    config = write_vit_config(tmp_path / "c1.py", vision["model"], one_class)
    line = one_line_error(["train", config, "--run-dir", tmp_path / "r1"], capsys)
    assert "needs one subfolder per class, two or more; found 1 (red)" in line
    empty_class = write_image_folder(tmp_path / "two", ("blue", "red"), per_class=2)
    (empty_class / "green").mkdir()
    config = write_vit_config(tmp_path / "c2.py", vision["model"], empty_class)
    line = one_line_error(["train", config, "--run-dir", tmp_path / "r2"], capsys)
    assert f"{empty_class / 'green'}: class folder holds no images" in line
    config = write_vit_config(tmp_path / "c3.py", vision["model"], tmp_path / "missing")
    assert "image folder does not exist" in one_line_error(["train", config, "--run-dir", tmp_path / "r3"], capsys)
    assert not any((tmp_path / f"r{i}").exists() for i in (1, 2, 3))


def test_llrd_and_gradual_unfreezing_on_vit_paths(vision, tmp_path, capsys):
    # Layer-wise LR decay over the two layers, and gradual unfreezing a group every 4 steps (head, layer 1,
    # layer 0, embeddings): the embeddings join at step 12, so after 12 steps they are the pretrained ones.
    config = tmp_path / "llrd.py"
    config.write_text(
        "from jaxft.config import load_config\nfrom jaxft.freeze import layerwise_lr_decay\n\n"
        f"config = load_config({str(vision['config'])!r}).derive(model={{'scan_layers': False}}, "
        "freeze={'rules': layerwise_lr_decay(0.5, 2, 'vit'), 'unfreeze_every_steps': 4}, "
        "train={'eval_every_steps': 0})\n"
    )
    run_dir = tmp_path / "run"
    train_in_process(config, run_dir)
    from safetensors.numpy import load_file

    pretrained = load_file(vision["model"] / "model.safetensors")
    query = lambda i: pretrained[f"vit.encoder.layer.{i}.attention.attention.query.weight"].T  # noqa: E731
    at4, at12 = run_params(run_dir, 4), run_params(run_dir, 12)
    kernel = lambda params, i: params[f"layers/{i}/attention/query/kernel"].reshape(query(i).shape)  # noqa: E731
    for i in (0, 1):  # layer 1 joins the training after step 4, layer 0 after step 8
        np.testing.assert_array_equal(kernel(at4, i), query(i))
        assert not np.array_equal(kernel(at12, i), query(i))
    assert not np.array_equal(at4["classifier/kernel"], 0 * at4["classifier/kernel"])
    cls_token = pretrained["vit.embeddings.cls_token"].reshape(-1)
    np.testing.assert_array_equal(at12["embeddings/cls_token"].reshape(-1), cls_token)
    params = json.loads((run_dir / "run.json").read_text())["freeze_plan"]["params"]
    assert params["layers/1/up/kernel"]["lr_multiplier"] == 0.5
    assert params["layers/0/attention/query/kernel"]["lr_multiplier"] == 0.25
    assert params["embeddings/cls_token"]["lr_multiplier"] == 0.125
    assert params["classifier/kernel"]["lr_multiplier"] == 1.0
    # Per-layer rules on the default scanned stack say what to change.
    scanned = tmp_path / "scanned.py"
    scanned.write_text(config.read_text().replace("'scan_layers': False", "'scan_layers': True"))
    line = one_line_error(["train", scanned, "--run-dir", tmp_path / "r2"], capsys)
    assert "model.scan_layers=false" in line


def test_plan_compiles_the_vit_step_for_a_tpu_slice(vision, tmp_path, capsys):
    # Plan reads the class folders' names, and no image: nothing is prepared under data.data_dir.
    images = write_image_folder(tmp_path / "images", CLASSES[:4], per_class=1)
    args = [
        "--target",
        "v5e:2x2",
        "--json",
        "mesh.data=4",
        f"data.train_dir={images}",
        f"data.data_dir={tmp_path / 'tfds'}",
    ]
    assert cli.main(["plan", str(vision["config"]), *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "tfds").exists()
    assert report["devices"] == 4 and report["fits"] is True and report["scan_layers"] is True  # auto, on a TPU
    assert report["per_device"]["argument_bytes"] > 0 and report["flops_per_step"] > 0
    # The matmuls of a full fine-tune: 6 FLOPs per weight per patch token (+ [CLS]) of 2 images per chip at least.
    weights = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # two layers' attention and MLP kernels
    assert report["flops_per_step"] >= 6 * weights * 17 * 2


class JaxftTestPetals(tfds.core.GeneratorBasedBuilder):
    """A registered image dataset as tfds catalogues hold them: encoded images, a ClassLabel, a file name."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "photo": tfds.features.Image(),
            "kind": tfds.features.ClassLabel(names=list(CLASSES)),
            "file_name": tfds.features.Text(),
        }
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}

    def _generate_examples(self, split):
        for path in sorted(Path(self._folders[split]).rglob("*.*")):
            yield (
                path.name + path.parent.name,
                {
                    "photo": path.read_bytes(),
                    "kind": path.parent.name,
                    "file_name": path.name,
                },
            )


def test_a_registered_tfds_image_dataset_trains_by_name(vision, tmp_path, capsys):
    JaxftTestPetals._folders = {"train": vision["train"], "val": vision["val"]}
    tfds_dir = tmp_path / "tfds"
    JaxftTestPetals(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    data = {
        "dataset": "jaxft_test_petals",
        "data_dir": str(tfds_dir),
        "image_column": "photo",
        "label_column": "kind",
        "eval_split": "validation",
    }
    config = write_vit_config(tmp_path / "c.py", vision["model"], vision["train"], data=data, train={"max_steps": 4})
    run_dir = tmp_path / "run"
    train_in_process(config, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["label_names"] == list(CLASSES)
    last = metrics_records(run_dir)[-1]
    assert last["step"] == 4 and last["eval_examples"] == 4 * len(CLASSES)
    line = one_line_error(["train", config, "--run-dir", tmp_path / "r2", "data.image_column=image"], capsys)
    assert "data.image_column: jaxft_test_petals has no Image feature 'image'" in line
