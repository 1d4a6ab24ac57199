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
LAYERS = "layers"  # the stacked-layer axis of scanned decoders
# Key/value heads under grouped-query attention: fewer than the query heads (HEADS), so a mesh rule may need to
# treat them differently (a tensor axis larger than the kv head count must replicate them).
KV_HEADS = "kv_heads"
