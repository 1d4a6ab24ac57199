"""Image transforms the host runs in grain's worker threads: decoding to RGB, the train augmentation (inception-style
random resized crop, horizontal flip, RandAugment-style ops, mixup and cutmix pairs) and the eval transform that an
export writes as its preprocessor_config.json. Pure functions of an image and a numpy Generator; no I/O, no jax.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# The normalisation of a checkpoint that ships no preprocessor_config.json: HF ViT's default.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
RESAMPLE = Image.Resampling.BICUBIC  # every resize; preprocessor_config.json says so (resample=3)


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image (unknown format, truncated, corrupt)."""


def decode_rgb(data: bytes | np.ndarray) -> Image.Image:
    """An RGB PIL image from encoded bytes (or an HWC uint8 array); grayscale and palette images are converted,
    and transparency is composited onto white, as HF image processors do."""
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1 else data)
    else:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes every pixel: a truncated file fails here, not later
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """[C, H, W] float32: pixels / 255, less the mean, over the std (channels first, as HF processors give)."""
        x_HxWxC = np.asarray(image, np.float32) * np.float32(1 / 255)
        x_HxWxC = (x_HxWxC - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x_HxWxC.transpose(2, 0, 1))


def image_stats(folder: Path, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> Normalize:
    """The normalisation to use: data.image_mean/std where set, else the checkpoint's preprocessor_config.json, else
    HF ViT's default (0.5 per channel)."""
    import json

    saved: dict[str, Any] = {}
    path = Path(folder) / "preprocessor_config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
    as3 = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    return Normalize(
        as3(mean or saved.get("image_mean", DEFAULT_MEAN)), as3(std or saved.get("image_std", DEFAULT_STD))
    )


# --------------------------------------------------------------------------------------------------- eval


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """The shorter side resized to `resize` (bicubic), the centre `size` square cropped, normalised. The same steps
    as HF's BitImageProcessor with size={"shortest_edge": resize} and crop_size=size: what an export writes."""

    size: int
    resize: int
    norm: Normalize

    @classmethod
    def build(cls, size: int, crop_fraction: float, norm: Normalize) -> EvalTransform:
        return cls(size, int(size / crop_fraction), norm)

    def __call__(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)  # as transformers sizes the long side
        new_w, new_h = (self.resize, new_long) if w <= h else (new_long, self.resize)
        image = image.resize((new_w, new_h), RESAMPLE)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        if top < 0 or left < 0:  # only when crop_fraction is 1 and rounding made a side short: pad as HF does
            image = ImageOps.pad(image, (max(new_w, self.size), max(new_h, self.size)), color=(0, 0, 0))
            top, left = max(top, 0), max(left, 0)
        return self.norm(image.crop((left, top, left + self.size, top + self.size)))

    def record(self) -> dict[str, Any]:
        """This transform as run.json keeps it (EvalTransform.from_record reads it back)."""
        return {
            "size": self.size,
            "resize": self.resize,
            "image_mean": list(self.norm.mean),
            "image_std": list(self.norm.std),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EvalTransform:
        norm = Normalize(tuple(record["image_mean"]), tuple(record["image_std"]))
        return cls(int(record["size"]), int(record["resize"]), norm)

    def preprocessor_config(self) -> dict[str, Any]:
        """This transform as an HF preprocessor_config.json (AutoImageProcessor loads it as a BitImageProcessor)."""
        return {
            "image_processor_type": "BitImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": self.resize},
            "resample": int(RESAMPLE),
            "do_center_crop": True,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.norm.mean),
            "image_std": list(self.norm.std),
        }


# -------------------------------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Random resized crop to `size` (area share in `scale`, aspect ratio in `ratio`, log-uniform), a horizontal
    flip half the time (`flip`), `ops` RandAugment-style ops at `magnitude` of 10, normalised."""

    size: int
    norm: Normalize
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    ops: int = 0
    magnitude: int = 9

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        box = crop_box(image.size, self.scale, self.ratio, rng)
        image = image.resize((self.size, self.size), RESAMPLE, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for _ in range(self.ops):
            op = RAND_OPS[int(rng.integers(len(RAND_OPS)))]
            image = op(image, self.magnitude / 10, rng)
        return self.norm(image)


def crop_box(
    size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of an inception-style crop: up to 10 draws of an area share and a log-uniform
    aspect ratio that fit the image; failing those, the centre crop of the ratio range nearest the image's."""
    w, h = size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=(128,) * 3)


# Each op: (image, strength in [0, 1], rng) -> image. Strength 1 is RandAugment's magnitude 10: rotations of 30°,
# shears of 0.3, translations of 45% of the side, enhancements of ±0.9, posterize to 4 bits, solarize at 0.
RAND_OPS = (
    lambda im, s, rng: im,  # identity
    lambda im, s, rng: ImageOps.autocontrast(im),
    lambda im, s, rng: ImageOps.equalize(im),
    lambda im, s, rng: im.rotate(_signed(30 * s, rng), Image.Resampling.BILINEAR, fillcolor=(128,) * 3),
    lambda im, s, rng: ImageOps.solarize(im, int(256 - 256 * s)),
    lambda im, s, rng: ImageOps.posterize(im, max(1, 8 - int(4 * s))),
    lambda im, s, rng: ImageEnhance.Color(im).enhance(1 + _signed(0.9 * s, rng)),
    lambda im, s, rng: ImageEnhance.Contrast(im).enhance(1 + _signed(0.9 * s, rng)),
    lambda im, s, rng: ImageEnhance.Brightness(im).enhance(1 + _signed(0.9 * s, rng)),
    lambda im, s, rng: ImageEnhance.Sharpness(im).enhance(1 + _signed(0.9 * s, rng)),
    lambda im, s, rng: _affine(im, (1, _signed(0.3 * s, rng), 0, 0, 1, 0)),  # shear x
    lambda im, s, rng: _affine(im, (1, 0, 0, _signed(0.3 * s, rng), 1, 0)),  # shear y
    lambda im, s, rng: _affine(im, (1, 0, _signed(0.45 * s * im.size[0], rng), 0, 1, 0)),  # translate x
    lambda im, s, rng: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * s * im.size[1], rng))),  # translate y
)


# ---------------------------------------------------------------------------------------------- mixing


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup and cutmix over pairs of images: rows 2k and 2k+1 of a global batch blend with each other, with one
    weight per pair from Beta(alpha, alpha), taken as the larger of w and 1 - w so that each image's own label
    keeps the larger share (and accuracy counts it). With both alphas, each pair takes one of the two."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def mix_pair(
        self, a_CxHxW: np.ndarray, b_CxHxW: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """The two mixed images and the weight of each one's own label."""
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
        weight = rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha]))
        weight = max(weight, 1.0 - weight)
        if not cutmix:
            return weight * a_CxHxW + (1 - weight) * b_CxHxW, weight * b_CxHxW + (1 - weight) * a_CxHxW, weight
        _, H, W = a_CxHxW.shape
        # Sides rounded down: the box never takes more than 1 - weight of the image, so each keeps the larger share.
        ch, cw = int(H * math.sqrt(1 - weight)), int(W * math.sqrt(1 - weight))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        top, bottom = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), H)
        left, right = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), W)
        a2, b2 = a_CxHxW.copy(), b_CxHxW.copy()
        a2[:, top:bottom, left:right] = b_CxHxW[:, top:bottom, left:right]
        b2[:, top:bottom, left:right] = a_CxHxW[:, top:bottom, left:right]
        return a2, b2, 1.0 - (bottom - top) * (right - left) / (H * W)  # the share the box left to each image
