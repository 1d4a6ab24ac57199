"""Images/s of jaxft's image input pipeline alone: the train iterator a run reads (tfds array_record of encoded
images → grain worker threads that decode, random-resized-crop, flip and normalise each image → global batches),
on JPEGs the size of an average ImageNet photo, to set beside the train step's images/s (bench/vision_throughput.py).

  python bench/image_pipeline.py [--images 256] [--width 500 --height 375] [--size 224] [--batch 8]
      [--workers 0] [--batches 30] [--randaugment 0] [--mixup 0] --json

Prints one JSON line: images_per_sec (batches after the first two, whose wait includes starting the threads),
decode_ms and transform_ms (one image on one thread, median: the per-image cost the workers share),
prepare_images_per_sec (the one-off tfds prepare, which decodes every image once to check it), the worker count
and os.cpu_count().
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from jaxft import setup
from jaxft.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from jaxft.data import images as images_lib
from jaxft.data.train_data import TrainData


def write_jpegs(root: Path, n: int, width: int, height: int, classes: int = 4) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain, quality 90), `n` over `classes` folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
        low = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BILINEAR), np.float32)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % classes}" / f"{i:05d}.jpg", quality=90)


def per_image_ms(folder: Path, size: int, repeats: int = 20) -> tuple[float, float]:
    """Median milliseconds to decode one image, and to transform it (train crop + flip + normalise)."""
    files = sorted(folder.rglob("*.jpg"))[:repeats]
    transform = images_lib.TrainTransform(size, images_lib.Normalize((0.5,) * 3, (0.5,) * 3))
    decode, apply = [], []
    for i, f in enumerate(files):
        data = f.read_bytes()
        t = time.perf_counter()
        image = images_lib.decode_rgb(data)
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        transform(image, np.random.default_rng(i))
        apply.append(time.perf_counter() - t)
    return 1e3 * statistics.median(decode), 1e3 * statistics.median(apply)


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root / "images", args.images, args.width, args.height)
        data = DataConfig(
            dataset="imagefolder",
            train_dir=str(root / "images"),
            data_dir=str(root / "tfds"),
            workers=args.workers,
            randaugment_ops=args.randaugment,
            mixup_alpha=args.mixup,
        )
        cfg = Config(
            model=ModelConfig(task="image-classification"),
            mesh=MeshConfig(),
            train=TrainConfig(batch_size=args.batch),
            data=data,
        )
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # tfds announces the prepare on stdout: JSON lines only there
            train_data = TrainData(cfg)
        prepare_s = time.perf_counter() - t
        train_data.open(root / "images", SimpleNamespace(image_size=args.size), setup.build_mesh(cfg))
        it = iter(train_data.train_dataset)
        for _ in range(2):  # thread start-up and the first prefetch
            batch = next(it)
        t = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        seconds = time.perf_counter() - t
        assert batch["pixel_values"].shape == (args.batch, 3, args.size, args.size)
        decode_ms, transform_ms = per_image_ms(root / "images", args.size)
    from jaxft.data.image_pipeline import workers

    return {
        "impl": "jaxft-image-pipeline",
        "images_per_sec": args.batches * args.batch / seconds,
        "decode_ms": decode_ms,
        "transform_ms": transform_ms,
        "prepare_images_per_sec": args.images / prepare_s,
        "source_image": f"{args.width}x{args.height} jpeg",
        "size": args.size,
        "batch": args.batch,
        "workers": workers(data),
        "cpu_count": os.cpu_count(),
        "randaugment_ops": args.randaugment,
        "mixup_alpha": args.mixup,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="data.workers (0: one per core, at most 16)")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--randaugment", type=int, default=0, help="data.randaugment_ops")
    p.add_argument("--mixup", type=float, default=0.0, help="data.mixup_alpha")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    result = run(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
