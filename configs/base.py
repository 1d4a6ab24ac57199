"""Base config: every shipped config derives from this one and changes a few fields.

Run:  jaxft train configs/base.py --run-dir runs/base [section.key=value ...]
"""

from jaxft.config import Config

config = Config()
