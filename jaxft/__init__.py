"""jaxft: fine-tune pretrained Hugging Face models in JAX/Flax NNX. Public API only.

`jaxft.load` is the function below; the checkpoint readers live in the module `jaxft.load` (import its names with
`from jaxft.load import ...`).
"""

from jaxft import hostmem as _hostmem

# Before JAX is imported (jaxft.setup imports it): on a host with no accelerator attached, JAX is kept from
# probing for a TPU or GPU whose plugin is installed (for `plan --target`), which would only print failures.
_hostmem.keep_jax_off_absent_accelerators()

from jaxft.setup import load_model as load  # noqa: E402

__all__ = ["load"]
