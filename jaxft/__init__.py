"""jaxft: fine-tune pretrained Hugging Face models in JAX/Flax NNX. Public API only.

`jaxft.load` is the function below; the checkpoint readers live in the module `jaxft.load` (import its names with
`from jaxft.load import ...`).
"""

from jaxft.setup import load_model as load

__all__ = ["load"]
