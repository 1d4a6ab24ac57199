"""The run's data: tfds builders, tokenization, packing and grain pipelines (the modules of this package)."""

# The label of a position that carries no loss (padding, special tokens, sub-word continuations): the data
# pipelines write it and the classification loss skips it (HF's convention).
IGNORE_LABEL = -100
