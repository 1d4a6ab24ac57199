"""Image data: decoding to RGB, the eval transform against transformers' own processor, normalisation stats, the
train augmentation (crop, flip, RandAugment ops), mixup/cutmix, the image folder and files builders (bad images,
reuse, content keys), the grain train/eval pipelines (determinism, resume, process splits, epochs) and the data.*
image keys' validation."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft.config import ConfigError, DataConfig, apply_overrides, base, validate
from jaxft.data import image_builders, image_pipeline, images
from jaxft.data.builders import DataError
from jaxft.data.images import EvalTransform, ImageDecodeError, Mixing, Normalize, TrainTransform
from jaxft.mesh import BatchRows

HALF = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int32)


# ------------------------------------------------------------------------------------------------ decoding


def _palette(transparent: bool) -> Image.Image:
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0] + [0] * (253 * 3))
    if transparent:
        image.info["transparency"] = 0
    return image


def test_grayscale_palette_and_16_bit_decode_to_rgb():
    gray = np.array([[0, 50, 100], [150, 200, 255]], np.uint8)
    out = images.decode_rgb(_encode(Image.fromarray(gray, mode="L")))
    assert out.mode == "RGB" and out.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(out), np.repeat(gray[..., None], 3, -1))

    out = images.decode_rgb(_encode(_palette(transparent=False)))
    assert out.mode == "RGB"
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0]])
    np.testing.assert_array_equal(_pixels(out), colours[[[0, 1, 2], [2, 1, 0]]])

    sixteen = Image.fromarray(np.array([[0, 100], [200, 60000]], np.uint16))
    data = _encode(sixteen)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = images.decode_rgb(data)
    assert out.mode == "RGB" and out.size == (2, 2)
    x = _pixels(out)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()  # still grey
    assert x[0, 0, 0] == 0 and x[1, 1, 0] == 255


def test_transparency_is_composited_onto_white():
    # A palette image whose index 0 is transparent: those pixels become white, the others keep their colour.
    out = images.decode_rgb(_encode(_palette(transparent=True)))
    assert out.mode == "RGB"
    expected = np.array([[255, 255, 255], [200, 0, 0], [0, 200, 0]])[[[0, 1, 2], [2, 1, 0]]]
    np.testing.assert_array_equal(_pixels(out), expected)

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[0, 2] = (0, 0, 0, 128)  # half: half way to white
    rgba[1] = (100, 0, 200, 255)
    out = _pixels(images.decode_rgb(_encode(Image.fromarray(rgba, mode="RGBA"))))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])
    assert (out[1] == [100, 0, 200]).all()

    la = np.array([[[40, 0], [40, 255]]], np.uint8)  # grey 40: transparent, opaque
    out = _pixels(images.decode_rgb(_encode(Image.fromarray(la, mode="LA"))))
    assert out[0].tolist() == [[255, 255, 255], [40, 40, 40]]

    # An RGB PNG with a transparent colour (tRNS chunk).
    rgb = np.array([[[1, 2, 3], [9, 9, 9]]], np.uint8)
    out = _pixels(images.decode_rgb(_encode(Image.fromarray(rgb), transparency=(1, 2, 3))))
    assert out[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_cmyk_jpeg_and_arrays_decode_to_rgb():
    cmyk = Image.new("CMYK", (12, 9), (0, 255, 255, 0))  # red
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = images.decode_rgb(data)
    assert out.mode == "RGB" and out.size == (12, 9)
    r, g, b = _pixels(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    out = images.decode_rgb(gray)  # HxWx1
    assert out.mode == "RGB" and out.size == (4, 3)
    np.testing.assert_array_equal(np.asarray(out)[..., 2], gray[..., 0])
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert _pixels(images.decode_rgb(rgba)).tolist() == [[[255] * 3] * 2] * 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, mode="L"),
        lambda: _palette(transparent=False),
        lambda: _palette(transparent=True),
        lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8), mode="RGBA"),
        lambda: Image.fromarray(np.random.default_rng(1).integers(0, 256, (3, 4, 2), dtype=np.uint8), mode="LA"),
        lambda: Image.new("CMYK", (5, 4), (10, 200, 30, 40)),
    ],
    ids=["L", "P", "P-transparent", "RGBA", "LA", "CMYK"],
)
def test_decode_matches_transformers_convert_to_rgb(make):
    from transformers.image_transforms import convert_to_rgb

    image = make()
    data = _encode(image, "JPEG" if image.mode == "CMYK" else "PNG")
    reference = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    np.testing.assert_array_equal(np.asarray(images.decode_rgb(data)), reference)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_fail_to_decode(fmt):
    data = _encode(_noise(64, 48), fmt)
    images.decode_rgb(data)  # the whole file is fine
    with pytest.raises(ImageDecodeError):
        images.decode_rgb(data[: len(data) // 2])


def test_random_and_empty_bytes_fail_to_decode():
    with pytest.raises(ImageDecodeError):
        images.decode_rgb(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageDecodeError):
        images.decode_rgb(b"")
    assert issubclass(ImageDecodeError, ValueError)


# --------------------------------------------------------------------------------------- normalise and eval


def test_normalize_is_channels_first_float32():
    image = _noise(5, 3)
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    x = norm(image)
    assert x.shape == (3, 3, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (np.asarray(image, np.float64) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), atol=1e-6)


def test_image_stats_file_overrides_and_default(tmp_path):
    assert images.image_stats(tmp_path) == Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    saved = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    assert images.image_stats(tmp_path) == Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert images.image_stats(tmp_path, mean=(0.1, 0.2, 0.3)) == Normalize((0.1, 0.2, 0.3), (0.229, 0.224, 0.225))
    both = images.image_stats(tmp_path, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert both == Normalize((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.25, "image_std": 0.75}))
    assert images.image_stats(tmp_path) == Normalize((0.25,) * 3, (0.75,) * 3)  # one value for every channel


def test_image_transforms_build_from_the_data_config(tmp_path):
    saved = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    data = DataConfig(
        crop_scale=(0.3, 0.9),
        crop_ratio=(0.5, 2.0),
        flip=False,
        randaugment_ops=2,
        randaugment_magnitude=7,
        crop_fraction=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
    )
    t = image_pipeline.ImageTransforms.build(data, tmp_path, 32)
    norm = Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert t.train == TrainTransform(32, norm, (0.3, 0.9), (0.5, 2.0), False, 2, 7)
    assert t.eval == EvalTransform(32, 64, norm)
    assert t.mixing == Mixing(0.2, 1.0) and t.mixing.enabled
    assert EvalTransform.from_record(json.loads(json.dumps(t.record()))) == t.eval
    assert not Mixing().enabled


EVAL_SIZES = [(37, 53), (100, 31), (32, 32), (500, 375), (31, 100), (17, 16), (5, 7)]


@pytest.mark.parametrize("size, fraction", [(32, 0.875), (16, 1.0), (16, 0.6)])
def test_eval_transform_equals_transformers_processor(tmp_path, size, fraction):
    from transformers import AutoImageProcessor

    transform = EvalTransform.build(size, fraction, Normalize((0.45, 0.5, 0.55), (0.2, 0.3, 0.25)))
    assert transform.resize == int(size / fraction)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(transform.preprocessor_config()))
    processor = AutoImageProcessor.from_pretrained(str(tmp_path))
    for i, (w, h) in enumerate(EVAL_SIZES):
        image = _noise(w, h, seed=i)
        ours = transform(image)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"{w}x{h}")
    # A transparent image: transformers composites it onto white, as decode_rgb does before the transform.
    rgba = Image.fromarray(np.random.default_rng(9).integers(0, 256, (23, 41, 4), dtype=np.uint8), mode="RGBA")
    theirs = processor(images=rgba, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(transform(images.decode_rgb(_encode(rgba))), theirs, atol=1e-5)


def test_eval_transform_record_round_trip():
    transform = EvalTransform.build(24, 0.8, Normalize((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
    assert (transform.size, transform.resize) == (24, 30)
    record = transform.record()
    assert record == {"size": 24, "resize": 30, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    back = EvalTransform.from_record(json.loads(json.dumps(record)))
    assert back == transform
    image = _noise(40, 27)
    np.testing.assert_array_equal(back(image), transform(image))
    config = transform.preprocessor_config()
    assert config["size"] == {"shortest_edge": 30} and config["crop_size"] == {"height": 24, "width": 24}
    assert config["resample"] == 3 and config["image_mean"] == [0.1, 0.2, 0.3]


# ----------------------------------------------------------------------------------------------- train


def test_train_transform_shape_and_seeding():
    transform = TrainTransform(16, HALF, ops=2)
    image = _noise(37, 29)
    out = transform(image, np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out, transform(image, np.random.default_rng(0)))
    others = [transform(image, np.random.default_rng(s)) for s in range(1, 6)]
    assert all(not np.array_equal(out, o) for o in others)
    assert np.abs(out).max() <= 1.0 + 1e-6  # normalised 0..255 with mean = std = 0.5


def _half_black_half_white(w: int = 20, h: int = 20) -> Image.Image:
    x = np.zeros((h, w, 3), np.uint8)
    x[:, w // 2 :] = 255
    return Image.fromarray(x)


def test_flip_happens_about_half_the_time_and_never_when_off():
    image = _half_black_half_white()

    def flipped(flip: bool) -> list[bool]:
        transform = TrainTransform(16, HALF, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=flip)
        outs = [transform(image, np.random.default_rng(s)) for s in range(40)]
        for o in outs:  # the whole image each time: one half black, the other white
            assert np.allclose(o[:, :, :7], o[0, 0, 0], atol=1e-6) and np.allclose(o[:, :, 9:], -o[0, 0, 0], atol=1e-6)
        return [bool(o[0, 0, 0] > 0) for o in outs]  # white on the left: flipped

    assert not any(flipped(False))
    assert 8 <= sum(flipped(True)) <= 32


@pytest.mark.parametrize(
    "size, scale, ratio",
    [
        ((200, 150), (0.08, 1.0), (3 / 4, 4 / 3)),
        ((400, 400), (0.3, 0.5), (0.5, 2.0)),
        ((90, 300), (0.02, 0.1), (0.5, 2.0)),
        ((64, 64), (0.5, 1.0), (1, 1)),
    ],
)
def test_crop_box_lies_inside_with_its_area_share_and_ratio_in_range(size, scale, ratio):
    w, h = size
    shares = []
    for seed in range(400):
        left, top, right, bottom = images.crop_box(size, scale, ratio, np.random.default_rng(seed))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h, (seed, (left, top, right, bottom))
        cw, ch = right - left, bottom - top
        share = cw * ch / (w * h)
        if share == 1.0 and scale[1] < 1.0:
            pytest.fail(f"seed {seed}: fell back to the whole image, though every draw of {scale} fits")
        # the sides are rounded: a few percent either way on these sizes
        assert scale[0] * 0.95 <= share <= scale[1] * 1.05 or share == 1.0, (seed, share)
        assert ratio[0] * 0.95 <= cw / ch <= ratio[1] * 1.05, (seed, cw, ch)
        shares.append(share)
    span = scale[1] - scale[0]
    assert min(shares) < scale[0] + 0.2 * span and max(shares) > scale[1] - 0.2 * span  # the range is drawn from


def test_crop_box_falls_back_to_the_centre_for_extreme_aspect_ratios():
    rng = np.random.default_rng(0)
    # No draw of 8%..100% of the area at ratio 3/4..4/3 fits 10 pixels: the centre crop nearest the range's end.
    assert images.crop_box((200, 10), (0.08, 1.0), (3 / 4, 4 / 3), rng) == (93, 0, 106, 10)
    assert images.crop_box((10, 200), (0.08, 1.0), (3 / 4, 4 / 3), rng) == (0, 93, 10, 106)
    for seed in range(20):
        box = images.crop_box((300, 7), (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
        assert box == (145, 0, 154, 7)
    # scale (1, 1), ratio (1, 1) on a square: the whole image.
    assert images.crop_box((33, 33), (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 33, 33)
    # An extreme image still gives the model input's shape.
    out = TrainTransform(16, HALF)(_noise(200, 10), np.random.default_rng(0))
    assert out.shape == (3, 16, 16)


@pytest.mark.parametrize("op", range(len(images.RAND_OPS)))
def test_every_rand_op_returns_an_rgb_image_of_the_same_size(op):
    image = _noise(23, 17, seed=op)
    for strength in (0.0, 0.5, 0.9, 1.0):
        out = images.RAND_OPS[op](image, strength, np.random.default_rng(op))
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (23, 17), (op, strength)


def test_rand_ops_at_full_strength():
    image = _noise(16, 12)
    solarize, posterize = images.RAND_OPS[4], images.RAND_OPS[5]
    np.testing.assert_array_equal(_pixels(solarize(image, 1.0, None)), 255 - _pixels(image))
    assert (_pixels(posterize(image, 1.0, None)) % 16 == 0).all()  # 4 bits
    assert images.RAND_OPS[0](image, 1.0, None) is image  # identity


def test_randaugment_at_magnitude_9_changes_the_image():
    image = _noise(30, 30)
    plain = TrainTransform(16, HALF, ops=0)
    augmented = TrainTransform(16, HALF, ops=2, magnitude=9)
    changed = [
        not np.array_equal(plain(image, np.random.default_rng(s)), augmented(image, np.random.default_rng(s)))
        for s in range(12)
    ]
    assert sum(changed) >= 10, changed
    # magnitude 0 leaves every op that has a magnitude at identity; a few ops (autocontrast, equalize) still act
    weak = TrainTransform(16, HALF, ops=1, magnitude=0)
    assert weak(image, np.random.default_rng(0)).shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- mixing


def test_mixup_blends_the_pair_with_the_larger_weight_on_each_own_image():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8, 6)).astype(np.float32), rng.normal(size=(3, 8, 6)).astype(np.float32)
    weights = []
    for seed in range(20):
        a2, b2, w = Mixing(mixup_alpha=0.4).mix_pair(a, b, np.random.default_rng(seed))
        assert 0.5 <= w <= 1.0
        np.testing.assert_allclose(a2, w * a + (1 - w) * b, atol=1e-6)
        np.testing.assert_allclose(b2, w * b + (1 - w) * a, atol=1e-6)
        weights.append(w)
    assert min(weights) < 0.9 and len(set(weights)) == 20


def _cutmix_box(a, b, a2) -> np.ndarray:
    """The mask of a2's pixels taken from b, checked to be one rectangle over all channels and a's elsewhere."""
    inside = a2 == b
    assert (inside == inside[0]).all()  # the same box in every channel
    inside = inside[0]
    np.testing.assert_array_equal(a2, np.where(inside, b, a))
    if inside.any():
        rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
        assert inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a filled rectangle
        assert inside.sum() == len(rows) * len(cols)
    return inside


def test_cutmix_pastes_a_box_and_weighs_by_the_pixel_share():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 16, 12)).astype(np.float32), rng.normal(size=(3, 16, 12)).astype(np.float32)
    boxes = 0
    for seed in range(30):
        a2, b2, w = Mixing(cutmix_alpha=1.0).mix_pair(a, b, np.random.default_rng(seed))
        inside = _cutmix_box(a, b, a2)
        np.testing.assert_array_equal(b2, np.where(inside, a, b))  # the other image: the same box, swapped
        assert w == pytest.approx(1.0 - inside.mean())  # the share of its own pixels
        assert w >= 0.4
        boxes += bool(inside.any())
    assert boxes >= 25


class _EvenDraw:
    """A Generator stand-in: Beta draws exactly 0.5, the box centred, cutmix chosen."""

    def random(self):
        return 0.0

    def beta(self, a, b):
        return 0.5

    def integers(self, n):
        return n // 2


def test_cutmix_leaves_each_image_the_larger_share():
    a, b = np.zeros((3, 24, 24), np.float32), np.ones((3, 24, 24), np.float32)
    a2, _, w = Mixing(cutmix_alpha=1.0).mix_pair(a, b, _EvenDraw())
    assert w == pytest.approx(1.0 - a2[0].mean())
    assert w >= 0.5


def test_with_both_alphas_each_pair_takes_one_of_the_two():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 8, 8)).astype(np.float32), rng.normal(size=(3, 8, 8)).astype(np.float32)
    kinds = []
    for seed in range(40):
        a2, _, w = Mixing(mixup_alpha=0.4, cutmix_alpha=1.0).mix_pair(a, b, np.random.default_rng(seed))
        cut = bool(((a2 == a) | (a2 == b)).all())
        if cut:
            assert w == pytest.approx(1.0 - _cutmix_box(a, b, a2).mean())
        else:
            np.testing.assert_allclose(a2, w * a + (1 - w) * b, atol=1e-6)
        kinds.append(cut)
    assert 5 <= sum(kinds) <= 35


# ------------------------------------------------------------------------------------------------ builders


def _save(path: Path, w: int = 10, h: int = 8, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)
    return path


def test_class_folder_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: image folder does not exist")):
        image_builders.class_folders(tmp_path / "nope")
    _save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(DataError, match=r"two or more; found 1 \(cat\)"):
        image_builders.image_splits(DataConfig(dataset="imagefolder", train_dir=str(tmp_path / "one")))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="found 0"):
        image_builders.class_folders(tmp_path / "none")

    root = tmp_path / "two"
    _save(root / "cat" / "a.png")
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(f"{root / 'dog'}: class folder holds no images")):
        image_builders.image_splits(DataConfig(dataset="imagefolder", train_dir=str(root)))
    _save(root / "dog" / "b.jpg")
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), label_names=("dog", "bird"))
    with pytest.raises(DataError, match=re.escape(f"{root / 'cat'}: class 'cat' is not in data.label_names")):
        image_builders.image_splits(cfg)


def test_image_folder_rows_labels_and_eval_dir(tmp_path):
    root, evals = tmp_path / "train", tmp_path / "eval"
    for name in ("b1.png", "a0.jpg", "deep/c.png"):
        _save(root / "zebra" / name)
    _save(root / "ant" / "x.PNG")
    _save(root / "ant" / ".hidden.png")
    (root / "ant" / "readme.md").write_text("x")
    _save(root / ".thumbs" / "t.png")  # a hidden folder is no class
    _save(evals / "ant" / "e.png")
    _save(evals / "zebra" / "f.png")
    splits, labels = image_builders.image_splits(
        DataConfig(dataset="imagefolder", train_dir=str(root), eval_dir=str(evals))
    )
    assert labels == ("ant", "zebra")  # sorted folder names
    assert splits["train"] == [
        (root / "ant" / "x.PNG", "ant"),
        (root / "zebra" / "a0.jpg", "zebra"),
        (root / "zebra" / "b1.png", "zebra"),
        (root / "zebra" / "deep" / "c.png", "zebra"),
    ]
    assert splits["test"] == [(evals / "ant" / "e.png", "ant"), (evals / "zebra" / "f.png", "zebra")]
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), label_names=("zebra", "ant", "cow"))
    assert image_builders.image_splits(cfg)[1] == ("zebra", "ant", "cow")  # label_names order the labels
    _save(evals / "cow" / "g.png")
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), eval_dir=str(evals))
    with pytest.raises(DataError, match=re.escape(f"{evals / 'cow'}: class 'cow' is not in data.label_names")):
        image_builders.image_splits(cfg)


def test_files_rows_resolve_relative_to_their_file(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    cat, dog = _save(sub / "img" / "cat.png"), _save(tmp_path / "elsewhere" / "dog.png")
    rows = sub / "rows.jsonl"
    rows.write_text(
        json.dumps({"image": "img/cat.png", "label": "cat"})
        + "\n\n"
        + json.dumps({"image": str(dog), "label": "dog"})
        + "\n"
    )
    csv_file = sub / "eval.csv"
    csv_file.write_text("file,y\nimg/cat.png,dog\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the file, not to the working directory
    splits, labels = image_builders.image_splits(DataConfig(dataset="files", train_files=(str(rows),)))
    assert labels == ("cat", "dog")
    assert splits == {"train": [(sub / "img" / "cat.png", "cat"), (dog, "dog")]}
    assert splits["train"][0][0].samefile(cat)
    cfg = DataConfig(
        dataset="files", train_files=(str(csv_file),), image_column="file", label_column="y", label_names=("dog", "x")
    )
    assert image_builders.image_splits(cfg) == ({"train": [(sub / "img" / "cat.png", "dog")]}, ("dog", "x"))


def test_files_row_errors(tmp_path):
    _save(tmp_path / "a.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"image": "a.png", "label": "x"}\n{"image": "gone.png", "label": "y"}\n')
    with pytest.raises(DataError, match=re.escape(f"{rows}:2: image {tmp_path / 'gone.png'} does not exist")):
        image_builders.image_splits(DataConfig(dataset="files", train_files=(str(rows),)))
    rows.write_text('{"image": "a.png", "label": "x"}\n{"path": "a.png", "label": "y"}\n')
    with pytest.raises(DataError, match=re.escape(f"{rows}:2: missing column 'image'")):
        image_builders.image_splits(DataConfig(dataset="files", train_files=(str(rows),)))
    rows.write_text('{"image": "a.png", "label": "x"}\n{"image": "a.png", "label": "x"}\n')
    with pytest.raises(DataError, match=r"needs two or more labels, found \['x'\]"):
        image_builders.image_splits(DataConfig(dataset="files", train_files=(str(rows),)))
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"image": "a.png", "label": "z"}\n')
    rows.write_text('{"image": "a.png", "label": "x"}\n{"image": "a.png", "label": "y"}\n')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'a.png'}: label 'z' is not in the label set")):
        image_builders.image_splits(DataConfig(dataset="files", train_files=(str(rows),), eval_files=(str(evals),)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="dataset is empty"):
        image_builders.image_splits(DataConfig(dataset="files", train_files=(str(empty),)))


def _small_folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(("a", "b")):
        for i in range(per_class):
            _save(root / name / f"{i}.png", 8 + i, 9, (60 * c + 10 * i, 100, 50))
    return root


def test_a_truncated_image_stops_the_prepare_naming_it_or_is_skipped(tmp_path, data_dir, caplog):
    root = _small_folder(tmp_path / "imgs")
    data = _encode(_noise(40, 30), "PNG")
    bad = root / "b" / "broken.png"
    bad.write_bytes(data[: len(data) // 2])
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), workers=2)
    with pytest.raises(DataError, match=re.escape(f"{bad}: unreadable image")):
        image_pipeline.open_image_sources(cfg)

    skip = dataclasses.replace(cfg, bad_images="skip")
    with caplog.at_level(logging.WARNING, logger="jaxft.data"):
        sources = image_pipeline.open_image_sources(skip)
    assert len(sources.train) == 6 and sources.eval is None and sources.label_names == ("a", "b")
    assert "data.bad_images=skip: left out 1 unreadable image(s) of train" in caplog.text
    assert str(bad) in caplog.text
    paths = {images_path(sources.train[i]) for i in range(len(sources.train))}
    assert str(bad) not in paths and len(paths) == 6
    builder = image_builders.build_image_dataset(skip, str(data_dir), *image_builders.image_splits(skip))
    skipped = json.loads((Path(builder.data_dir) / image_builders.SKIPPED_FILE).read_text())
    assert list(skipped) == ["train"] and len(skipped["train"]) == 1
    assert skipped["train"][0].startswith(f"{bad}: ")


def images_path(record) -> str:
    path = record["path"]
    return path.decode() if isinstance(path, bytes) else str(path)


def test_every_image_unreadable_is_an_error_even_when_skipping(tmp_path, data_dir):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), bad_images="skip")
    with pytest.raises(DataError, match="train: every image is unreadable"):
        image_pipeline.open_image_sources(cfg)


def test_the_prepared_dataset_is_reused_and_new_content_prepares_again(tmp_path, data_dir, monkeypatch):
    root = _small_folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), workers=2)
    calls = []
    original = image_builders.JaxftImages._generate_examples

    def counted(self, split, rows):
        calls.append((split, len(rows)))
        return original(self, split, rows)

    monkeypatch.setattr(image_builders.JaxftImages, "_generate_examples", counted)
    first = image_builders.build_image_dataset(cfg, str(data_dir), *image_builders.image_splits(cfg))
    assert calls == [("train", 6)]
    assert len(image_pipeline.open_image_sources(cfg).train) == 6
    again = image_builders.build_image_dataset(cfg, str(data_dir), *image_builders.image_splits(cfg))
    assert calls == [("train", 6)]  # no second prepare
    assert again.builder_config.name == first.builder_config.name and again.data_dir == first.data_dir

    _save(root / "a" / "new.png", 12, 12)
    grown = image_builders.build_image_dataset(cfg, str(data_dir), *image_builders.image_splits(cfg))
    assert calls == [("train", 6), ("train", 7)]
    assert grown.builder_config.name != first.builder_config.name
    assert len(image_pipeline.open_image_sources(cfg).train) == 7

    _save(root / "b" / "0.png", 20, 20, (1, 2, 3))  # rewritten in place: another size, another key
    rewritten = image_builders.build_image_dataset(cfg, str(data_dir), *image_builders.image_splits(cfg))
    assert rewritten.builder_config.name not in (first.builder_config.name, grown.builder_config.name)
    assert len(calls) == 3


def test_every_image_format_is_stored_as_its_own_bytes(tmp_path, data_dir):
    rng = np.random.default_rng(0)
    noise = lambda c: rng.integers(0, 256, (9, 12, c), dtype=np.uint8)
    root = tmp_path / "imgs"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    Image.fromarray(np.array([[0, 100], [200, 60000]], np.uint16)).save(root / "x" / "a16.png")
    Image.new("CMYK", (12, 9), (0, 255, 255, 0)).save(root / "x" / "cmyk.jpg")
    Image.fromarray(noise(3)).convert("P").save(root / "x" / "p.gif")
    Image.fromarray(noise(4), "RGBA").save(root / "x" / "rgba.png")
    Image.fromarray(noise(2), "LA").save(root / "x" / "la.png")
    for suffix in ("bmp", "tif", "webp", "ppm"):
        Image.fromarray(noise(3)).save(root / "x" / f"i.{suffix}")
    Image.fromarray(noise(1)[..., 0]).save(root / "x" / "g.pgm")
    Image.fromarray(noise(3)).save(root / "y" / "n.JPEG")
    sources = image_pipeline.open_image_sources(DataConfig(dataset="imagefolder", train_dir=str(root)))
    assert len(sources.train) == 11
    for i in range(11):
        record = sources.train[i]
        path = Path(images_path(record))
        assert record["image"] == path.read_bytes(), path.name
        assert images.decode_rgb(record["image"]).mode == "RGB"
        assert int(record["label"]) == ("x", "y").index(path.parent.name)


def test_label_names_order_the_class_indices(tmp_path, data_dir):
    root = _small_folder(tmp_path / "imgs", per_class=2)
    cfg = DataConfig(dataset="imagefolder", train_dir=str(root), label_names=("b", "a"))
    sources = image_pipeline.open_image_sources(cfg)
    assert sources.label_names == ("b", "a")
    for i in range(len(sources.train)):
        record = sources.train[i]
        assert int(record["label"]) == ("b", "a").index(Path(images_path(record)).parent.name)


def test_workers_default_to_the_cores():
    assert image_pipeline.workers(DataConfig(workers=3)) == 3
    assert 1 <= image_pipeline.workers(DataConfig()) <= 16


def test_files_dataset_opens_with_labels_and_paths(tmp_path, data_dir):
    _small_folder(tmp_path / "imgs", per_class=2)
    rows = tmp_path / "rows.jsonl"
    lines = [{"image": f"imgs/{c}/{i}.png", "label": c} for c in "ab" for i in range(2)]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = DataConfig(dataset="files", train_files=(str(rows),), eval_files=(str(rows),), workers=2)
    sources = image_pipeline.open_image_sources(cfg)
    assert sources.label_names == ("a", "b") and len(sources.train) == 4 and len(sources.eval) == 4
    for i in range(4):
        record = sources.train[i]
        path = Path(images_path(record))
        assert int(record["label"]) == "ab".index(path.parent.name)
        assert record["image"] == path.read_bytes()  # the file's own bytes, left encoded
    assert image_pipeline.open_image_sources(cfg, need_eval=False).eval is None


# --------------------------------------------------------------------------------------------- pipelines

# The train folder's images: image j (0..23) of class j // 8 has red 30 + 40 (j % 5) and green 30 + 40 (j // 5)
# everywhere, and a noisy blue gradient, so random crops and flips change it but its mean red and green name it.
N_TRAIN, CLASSES = 24, ("a", "b", "c")


def _identified(j: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(20, 40)), int(rng.integers(20, 40))
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0], x[..., 1] = 30 + 40 * (j % 5), 30 + 40 * (j // 5)
    x[..., 2] = np.clip(np.linspace(0, 200, w)[None, :] + rng.normal(0, 20, (h, w)), 0, 255)
    return Image.fromarray(x)


def _image_id(pixels_CxHxW: np.ndarray) -> int:
    rgb = (pixels_CxHxW * 0.5 + 0.5) * 255  # HALF undone
    r, g = rgb[0].mean(), rgb[1].mean()
    return int(round((r - 30) / 40)) + 5 * int(round((g - 30) / 40))


@pytest.fixture(scope="module")
def image_data(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("vision_data")
    for j in range(N_TRAIN):
        path = tmp / "train" / CLASSES[j // 8] / f"{j:02d}.{'png' if j % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _identified(j, j).save(path, quality=98)
    for j in range(9):
        _save(tmp / "eval" / CLASSES[j % 3] / f"{j}.png", 10 + j, 30 - j, (20 * j, 100, 200 - 10 * j))
    cfg = DataConfig(dataset="imagefolder", train_dir=str(tmp / "train"), eval_dir=str(tmp / "eval"), workers=2)
    sources = image_pipeline.open_image_sources(cfg)
    assert len(sources.train) == N_TRAIN and len(sources.eval) == 9
    return cfg, sources, tmp


def _transforms(tmp: Path, size: int = 16, **data) -> image_pipeline.ImageTransforms:
    return image_pipeline.ImageTransforms.build(DataConfig(workers=2, **data), tmp, size)


def _take(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert np.array_equal(g[k], e[k]), k


def test_train_batches_have_the_fields_and_are_seeded(image_data):
    _, sources, tmp = image_data
    transforms = _transforms(tmp)
    batches = _take(image_pipeline.build_train_dataset(sources, transforms, 8, seed=3, threads=2), 4)
    b = batches[0]
    assert set(b) == {"pixel_values", "labels", "mix_labels", "mix_weights", "weights"}
    assert b["pixel_values"].shape == (8, 3, 16, 16) and b["pixel_values"].dtype == np.float32
    assert b["labels"].shape == (8,) and b["labels"].dtype == np.int32
    assert b["mix_labels"].dtype == np.int32 and b["mix_weights"].dtype == np.float32
    np.testing.assert_array_equal(b["mix_labels"], b["labels"])
    assert b["mix_weights"].tolist() == [1.0] * 8 and b["weights"].tolist() == [1.0] * 8
    again = _take(image_pipeline.build_train_dataset(sources, transforms, 8, seed=3, threads=2), 4)
    _assert_batches_equal(again, batches)
    other = _take(image_pipeline.build_train_dataset(sources, transforms, 8, seed=4, threads=2), 1)[0]
    assert not np.array_equal(other["pixel_values"], b["pixel_values"])


def test_train_iterator_state_resumes_to_the_same_batches(image_data):
    _, sources, tmp = image_data
    transforms = _transforms(tmp, randaugment_ops=1)
    ds = image_pipeline.build_train_dataset(sources, transforms, 8, seed=5, threads=2)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]  # across the epoch boundary (3 batches an epoch)
    resumed = iter(image_pipeline.build_train_dataset(sources, transforms, 8, seed=5, threads=2))
    resumed.set_state(json.loads(json.dumps(state)))  # the checkpoint keeps it as JSON
    _assert_batches_equal([next(resumed) for _ in range(3)], expected)


def test_iterator_state_is_the_same_whatever_the_process_count(image_data):
    _, sources, tmp = image_data
    transforms = _transforms(tmp)
    whole = iter(image_pipeline.build_train_dataset(sources, transforms, 8, seed=5, threads=2))
    half = iter(image_pipeline.build_train_dataset(sources, transforms, BatchRows(8, np.arange(4)), 5, threads=2))
    for _ in range(2):
        next(whole), next(half)
    state = whole.get_state()
    expected = next(whole)
    # What train.py stores once for every process, restored on two processes (a run resumed on another count).
    resumed = iter(image_pipeline.build_train_dataset(sources, transforms, BatchRows(8, np.arange(4)), 5, 2))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["pixel_values"], expected["pixel_values"][:4])
    assert half.get_state() == state


def test_each_epoch_sees_every_training_image_once_reshuffled(image_data):
    _, sources, tmp = image_data
    batches = _take(image_pipeline.build_train_dataset(sources, _transforms(tmp), 8, seed=1, threads=2), 6)
    epochs = []
    for epoch in (batches[:3], batches[3:]):
        ids = [_image_id(x) for b in epoch for x in b["pixel_values"]]
        labels = np.concatenate([b["labels"] for b in epoch])
        assert sorted(ids) == list(range(N_TRAIN))
        assert labels.tolist() == [j // 8 for j in ids]  # each image with its own class
        assert np.bincount(labels).tolist() == [8, 8, 8]
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # reshuffled


@pytest.mark.parametrize("mixing", [{}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}], ids=["plain", "mixed"])
def test_two_processes_read_their_halves_of_the_same_global_batches(image_data, mixing):
    _, sources, tmp = image_data
    transforms = _transforms(tmp, flip=True, randaugment_ops=1, **mixing)
    whole = _take(image_pipeline.build_train_dataset(sources, transforms, 8, seed=2, threads=2), 4)
    for parts in ([np.arange(0, 4), np.arange(4, 8)], [np.array([0, 1, 6, 7]), np.array([2, 3, 4, 5])]):
        halves = [
            _take(image_pipeline.build_train_dataset(sources, transforms, BatchRows(8, mine), 2, threads=2), 4)
            for mine in parts
        ]
        for step in range(4):
            for k in whole[step]:
                for half, mine in zip(halves, parts):
                    assert half[step][k].shape[0] == 4
                    assert np.array_equal(half[step][k], whole[step][k][mine]), (step, k, mine)


def test_mixup_pairs_rows_2k_and_2k_plus_1(image_data):
    _, sources, tmp = image_data
    transforms = _transforms(tmp, mixup_alpha=0.4)
    plain = _take(image_pipeline.build_train_dataset(sources, _transforms(tmp), 8, seed=6, threads=2), 3)
    mixed = _take(image_pipeline.build_train_dataset(sources, transforms, 8, seed=6, threads=2), 3)
    for p, m in zip(plain, mixed):
        np.testing.assert_array_equal(m["labels"], p["labels"])  # the same images in the same rows
        np.testing.assert_array_equal(m["mix_labels"], m["labels"].reshape(4, 2)[:, ::-1].reshape(8))
        w = m["mix_weights"]
        assert (w >= 0.5).all() and (w <= 1.0).all() and (w[0::2] == w[1::2]).all()
        np.testing.assert_array_equal(m["weights"], np.ones(8, np.float32))
        # Mixup of the unmixed pair (the augmentation is seeded by position, mixing or not).
        a, b = p["pixel_values"][0::2], p["pixel_values"][1::2]
        ww = w[0::2, None, None, None]
        np.testing.assert_allclose(m["pixel_values"][0::2], ww * a + (1 - ww) * b, atol=1e-5)
        np.testing.assert_allclose(m["pixel_values"][1::2], ww * b + (1 - ww) * a, atol=1e-5)


def test_mixing_needs_each_process_to_hold_whole_pairs(image_data):
    _, sources, tmp = image_data
    mixed = _transforms(tmp, cutmix_alpha=1.0)
    for mine in ([0, 1, 2], [1, 2, 5, 6], [0, 2]):
        with pytest.raises(ConfigError, match=r"data\.mixup_alpha/cutmix_alpha: .*make each process's share even"):
            image_pipeline.build_train_dataset(sources, mixed, BatchRows(8, np.asarray(mine)), 0, threads=2)
    with pytest.raises(ConfigError, match="cutmix_alpha"):
        image_pipeline.build_train_dataset(sources, mixed, 7, 0, threads=2)
    # Without mixing an odd share is fine.
    ds = image_pipeline.build_train_dataset(sources, _transforms(tmp), BatchRows(8, np.asarray([0, 1, 2])), 0, 2)
    assert _take(ds, 1)[0]["pixel_values"].shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match="train.batch_size: 32 is larger than the 24 training examples"):
        image_pipeline.build_train_dataset(sources, _transforms(tmp), 32, 0, threads=2)


def _coloured(i: int) -> Image.Image:
    return Image.new("RGB", (12 + i, 9), (10 * i, 0, 0))


@pytest.mark.parametrize("n", [9, 10, 12])
def test_image_batches_cover_every_example_in_order_for_any_process_split(n):
    transform = EvalTransform.build(8, 1.0, HALF)
    read = lambda i: (_coloured(i), i)
    whole = list(image_pipeline.iter_image_batches(n, read, transform, 4, threads=2))
    assert len(whole) == 3
    weights = np.concatenate([b["weights"] for b in whole])
    assert weights.tolist() == [1.0] * n + [0.0] * (12 - n)
    labels = np.concatenate([b["labels"] for b in whole])
    assert labels[:n].tolist() == list(range(n))
    pixels = np.concatenate([b["pixel_values"] for b in whole])
    assert pixels.shape == (12, 3, 8, 8) and pixels.dtype == np.float32
    for i in range(n):
        np.testing.assert_array_equal(pixels[i], transform(_coloured(i)))
    assert not pixels[n:].any()  # blank padding
    for b in whole:
        np.testing.assert_array_equal(b["mix_labels"], b["labels"])
        np.testing.assert_array_equal(b["mix_weights"], np.ones(4, np.float32))
    for parts in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0], [1, 2, 3]]):
        for mine in parts:
            got = list(image_pipeline.iter_image_batches(n, read, transform, BatchRows(4, np.asarray(mine)), 2))
            assert len(got) == 3, mine  # the same number of batches in every process
            for g, w in zip(got, whole):
                for k in w:
                    np.testing.assert_array_equal(g[k], w[k][mine])


def test_eval_batches_give_every_eval_example_once(image_data):
    _, sources, tmp = image_data
    transform = _transforms(tmp).eval
    full = list(image_pipeline.iter_eval_batches(sources, transform, 4, threads=2))
    assert len(full) == 3
    assert full[2]["weights"].tolist() == [1.0, 0.0, 0.0, 0.0]
    pixels = np.concatenate([b["pixel_values"] for b in full])[:9]
    labels = np.concatenate([b["labels"] for b in full])[:9]
    for i in range(9):
        record = sources.eval[i]
        assert labels[i] == int(record["label"])
        np.testing.assert_array_equal(pixels[i], transform(images.decode_rgb(record["image"])))
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for mine in ([0, 1], [2, 3]):
        part = list(image_pipeline.iter_eval_batches(sources, transform, BatchRows(4, np.asarray(mine)), 2))
        assert len(part) == 3
        for p, f in zip(part, full):
            for k in f:
                np.testing.assert_array_equal(p[k], f[k][mine])


def test_an_unreadable_stored_image_names_its_path():
    class Source:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": b"not an image", "label": 0, "path": b"/data/x.png"}

    sources = image_pipeline.ImageSources(Source(), Source(), ("a", "b"), "image", "label")
    transform = images.EvalTransform(16, 18, images.Normalize((0.5,) * 3, (0.5,) * 3))
    with pytest.raises(DataError, match=re.escape("/data/x.png: unreadable image")):  # raised in a grain thread
        list(image_pipeline.iter_eval_batches(sources, transform, 2, threads=2))


# ------------------------------------------------------------------------------------------------ config


IMAGE_TASK = {"model.task": "image-classification"}


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"data.crop_scale": (0.9, 0.5)}, "data.crop_scale"),
        ({"data.crop_scale": (0.0, 0.5)}, "data.crop_scale"),
        ({"data.crop_scale": (0.5, 1.2)}, "data.crop_scale"),
        ({"data.crop_scale": (0.5,)}, "data.crop_scale"),
        ({"data.crop_ratio": (2.0, 1.0)}, "data.crop_ratio"),
        ({"data.crop_fraction": 0.0}, "data.crop_fraction"),
        ({"data.crop_fraction": 1.5}, "data.crop_fraction"),
        ({"data.randaugment_magnitude": 11}, "data.randaugment_magnitude"),
        ({"data.randaugment_magnitude": -1}, "data.randaugment_magnitude"),
        ({"data.randaugment_ops": -1}, "data.randaugment_ops"),
        ({"data.mixup_alpha": -0.1}, "data.mixup_alpha"),
        ({"data.image_mean": (0.5, 0.5)}, "data.image_mean"),
        ({"data.image_std": (0.5, 0.0, 0.5)}, "data.image_std"),
        ({"data.bad_images": "ignore"}, "data.bad_images"),
        ({"data.dataset": "imagefolder"}, "data.train_dir"),
        (
            {"model.task": "sequence-classification", "data.dataset": "imagefolder", "data.train_dir": "x"},
            "data.dataset",
        ),
    ],
)
def test_image_keys_are_validated(overrides, key):
    cfg = apply_overrides(base(), {**IMAGE_TASK, **overrides})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(key), str(e.value)


def test_valid_image_configs_pass():
    cfg = base(
        model={"task": "image-classification"},
        data={"dataset": "imagefolder", "train_dir": "x", "crop_scale": (1.0, 1.0), "crop_fraction": 1.0},
    )
    assert validate(cfg) is cfg
    cli = apply_overrides(
        cfg, ["data.crop_scale=0.2,0.9", "data.image_mean=0.1,0.2,0.3", "data.randaugment_magnitude=10"]
    )
    assert validate(cli).data.crop_scale == (0.2, 0.9) and cli.data.image_mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match=r"^data\.crop_scale: expected \[min, max\]"):
        validate(apply_overrides(cfg, ["data.crop_scale=0.9,0.2"]))
