"""jaxft: fine-tune pretrained Hugging Face encoders in JAX/Flax NNX. Public API only."""

from jaxft.pretrained import load

__all__ = ["load"]
