"""The band plan: the one data structure the LOP analysis, the cost model, LOSS and
the band executor share.

A recorded Program starts with a *local chain*: steps whose output rows depend only
on a band of input rows (conv, pool, eval batch-norm, activations, element-wise ops,
channel cat, residual adds), up to the first global op. A BandPlan says how one
inference splits that chain between robot and server:

  depth   the robot runs steps [0, depth) on its bands; the server runs the rest.
          0 is full offload. depth <= chain length allows bands; a deeper cut is a
          plain layer partition (one band, computed by the robot); depth == len(program)
          with every band on the robot is local execution.
  cuts    row boundaries of the bands at the output of step depth-1 (the rows the
          robot ships): (0, r1, r2, ..., H). len(cuts) - 1 bands.
  robot   per band, True if the robot computes it (and ships its result), False if
          the server computes it (the robot ships that band's input slice, with halo).

Special cases: local = BandPlan.local(n), full offload = BandPlan.offload(),
layer partition at d = BandPlan.layer(d, H).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BandPlan:
    depth: int
    cuts: tuple[int, ...]
    robot: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.cuts) != len(self.robot) + 1 or list(self.cuts) != sorted(self.cuts):
            raise ValueError(f"bad band plan: cuts {self.cuts}, robot {self.robot}")

    @property
    def n_bands(self) -> int:
        return len(self.robot)

    def bands(self) -> list[tuple[int, int, bool]]:
        """(first row, end row, computed by the robot) per non-empty band."""
        return [(a, b, r) for a, b, r in zip(self.cuts, self.cuts[1:], self.robot) if b > a]

    @staticmethod
    def offload() -> "BandPlan":
        return BandPlan(0, (0, 0), (False,))

    @staticmethod
    def layer(depth: int, rows: int) -> "BandPlan":
        return BandPlan(depth, (0, rows), (True,))

    @staticmethod
    def local(n_steps: int, rows: int = 1) -> "BandPlan":
        return BandPlan(n_steps, (0, rows), (True,))

    @staticmethod
    def even(depth: int, rows: int, robot: tuple[bool, ...]) -> "BandPlan":
        """len(robot) bands of (nearly) equal height."""
        n = len(robot)
        return BandPlan(depth, tuple(rows * i // n for i in range(n + 1)), tuple(robot))
