"""Datasets: tfds builders, tokenization and grain pipelines."""
