"""Length bucketing: the order of examples grouped by length inside shuffled mega-batches, and the bucket a batch
is padded to. Indices and lengths only; reading and tokenizing rows is the pipelines' job.

Every process computes the same global batches from the same lengths, so all pick the same bucket for a step.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import grain
import numpy as np

GROUP_BATCHES = 64  # batches per mega-batch, as the HF Trainer's group_by_length takes 50 × the batch


def bucket_for(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds a row of `longest` tokens (the last bucket is max_length, which every
    row fits after truncation)."""
    return buckets[min(bisect.bisect_left(buckets, longest), len(buckets) - 1)]


def grouped_batches(lengths: np.ndarray, size: int, seed: int, buckets: Sequence[int]) -> grain.MapDataset:
    """Element k: the example indices (`size` of them) of global batch k, over an endless stream of epochs.

    Each epoch is a seeded permutation of every example (numpy's, from (seed, epoch): a million examples take
    milliseconds), cut into mega-batches of GROUP_BATCHES × size examples, each grouped by bucket and cut into
    batch-sized blocks taken in a random order: so one batch holds rows of one bucket (or of two neighbouring
    ones), every example is seen once per epoch, and batch k depends on (seed, k) alone (a resume at batch k
    continues exactly). grain's iterator over it is what is checkpointed.

    Rows are grouped by their bucket, not sorted by their length: a batch is padded to its bucket either way,
    and inside a bucket the rows stay in the permutation's random order instead of running from long to short.
    """
    n = len(lengths)
    group = GROUP_BATCHES * size
    bucket_of = np.minimum(np.searchsorted(np.asarray(buckets), lengths, side="left"), len(buckets) - 1)

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)
        out = []
        for start in range(0, n, group):
            chunk = perm[start : start + group]
            chunk = chunk[np.argsort(-bucket_of[chunk], kind="stable")]  # the permutation's order within a bucket
            # The batch-sized blocks of a sorted mega-batch go in a random order: sorted alone, every mega-batch
            # (on a small dataset, every epoch) would run from its longest rows to its shortest.
            full = len(chunk) // size * size
            blocks = chunk[:full].reshape(-1, size)[rng.permutation(full // size)]
            out.extend([blocks.reshape(-1), chunk[full:]])
        return np.concatenate(out)

    def batch(k: int) -> np.ndarray:
        positions = np.arange(k * size, (k + 1) * size)
        epochs, offsets = np.divmod(positions, n)
        return np.asarray([epoch_order(int(e))[o] for e, o in zip(epochs, offsets)], np.int64)

    return grain.MapDataset.range(0, 2**62).map(batch)


def sorted_batches(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Eval: every example once, sorted by length (shortest first) and cut into batches of `size` indices; the
    last is short. The order of the examples does not change an eval's sums, only their padding."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]
