"""Logical axis names: model code names dimensions only through these; sharding.py maps them to the mesh.

Shape letters used in tensor names: B batch, L sequence, E embed, N heads, H head dim, F mlp, V vocab, C labels.
"""

BATCH = "batch"
SEQ = "seq"
EMBED = "embed"
HEADS = "heads"
KV = "kv"  # per-head feature dim
MLP = "mlp"
VOCAB = "vocab"
LABELS = "labels"
NORM = "norm"  # layer-norm scale/bias
POSITIONS = "positions"
TYPES = "types"
LAYERS = "layers"

# Label of a position that carries no loss (padding, special tokens, sub-word continuations).
IGNORE_LABEL = -100
