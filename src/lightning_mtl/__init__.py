"""lightning-mtl: a Lightning + Hydra template for multi-task learning.

The path of a batch: data module -> backbone -> heads -> losses -> weighting -> optimizer.
"""

__version__ = "0.1.0"
