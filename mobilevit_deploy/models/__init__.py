"""One module per family; importing them registers their specs."""

from . import fastvit, levit, seaformer

__all__ = ["fastvit", "levit", "seaformer"]
