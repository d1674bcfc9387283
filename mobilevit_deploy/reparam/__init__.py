"""Structural reparameterization and BatchNorm folding."""

from .engine import fold_sequential_pairs, reparameterize, training_leftovers

__all__ = ["fold_sequential_pairs", "reparameterize", "training_leftovers"]
