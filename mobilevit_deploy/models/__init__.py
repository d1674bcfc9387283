"""One module per family; importing them registers their specs."""

from . import efficientvit, fastvit, levit, seaformer, sepvit

__all__ = ["efficientvit", "fastvit", "levit", "seaformer", "sepvit"]
