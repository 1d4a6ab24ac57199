"""Fine-tune a ViT (or DeiT) image classifier on your own images: one subfolder per class under data.train_dir
(and data.eval_dir), e.g. my_images/train/cat/*.jpg, my_images/train/dog/*.jpg.

The recipe is the usual transfer one: a new head, initialised at zero (as big_vision does) even where the
checkpoint has one of its own; AdamW with warmup and a cosine decay; gradients clipped at norm 1; inception-style
random resized crops and horizontal flips for training, resize + centre crop for eval, normalised with the
checkpoint's preprocessor_config.json. data.image_size=384 fine-tunes at a higher resolution (the position
embeddings are resampled at load).
Plan it for the machine first, then run:
  jaxft plan configs/vit_image_classification.py --target v5litepod-4 data.train_dir=my_images/train
  jaxft train configs/vit_image_classification.py --run-dir runs/vit \
      data.train_dir=my_images/train data.eval_dir=my_images/val
"""

from jaxft.config import base

config = base(
    model={"source": "google/vit-base-patch16-224-in21k", "task": "image-classification"},
    load={
        "new_params": [r"classifier/.*"],
        "reinit_params": [r"classifier/.*"],  # a checkpoint's own head (ImageNet's 1000 classes) is not reused
        "zero_init_params": [r"classifier/.*"],
    },
    optim={"name": "adamw", "learning_rate": 1e-4, "warmup_steps": 100, "weight_decay": 0.05, "clip_grad_norm": 1.0},
    train={"max_steps": 2000, "batch_size": 64, "eval_every_steps": 200, "eval_batch_size": 64},
    data={"dataset": "imagefolder", "train_dir": "my_images/train", "eval_dir": "my_images/val"},
    checkpoint={"every_steps": 200, "keep_best_metric": "eval_accuracy"},
)
