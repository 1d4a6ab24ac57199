"""The run's data: tfds builders, tokenization, packing and grain pipelines (the modules of this package)."""

# The label of a position that carries no loss (padding, special tokens, sub-word continuations): the data
# pipelines write it and the classification loss skips it (HF's convention).
IGNORE_LABEL = -100


def selected_rows(rows) -> tuple[int, list[int]]:
    """(the global batch's size, this process's rows of it) from a mesh.BatchRows, or from an int: one process
    holding every row."""
    if isinstance(rows, int):
        return rows, list(range(rows))
    return rows.size, [int(i) for i in rows.mine]
