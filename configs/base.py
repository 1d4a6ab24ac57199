"""Base config: jaxft's defaults. Every shipped config derives from it (`jaxft.config.base(...)`) and changes a
few fields.

Run:  jaxft train configs/base.py --run-dir runs/base [section.key=value ...]
"""

from jaxft.config import base

config = base()
