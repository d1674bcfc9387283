"""One module per family; importing them registers their specs."""

from . import fastvit

__all__ = ["fastvit"]
