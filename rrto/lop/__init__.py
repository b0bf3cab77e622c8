"""Local Operator Parallelism: banded execution of a recorded program's local chain."""
from .plan import BandPlan

__all__ = ["BandPlan"]
