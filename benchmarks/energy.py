"""Robot energy per inference from time spent in each power state.

The robot is in one of four states at any moment: computing, transmitting, both at
once, or idle-waiting for the server. The default powers are Intra-DP's measurements
of a Jetson Xavier NX; pass a ``PowerModel`` for another robot. LOP's scheduler can
use the same model to trade latency for energy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PowerModel:
    compute_w: float = 13.35  # CPU/GPU busy
    transmit_w: float = 4.25  # radio sending, compute idle
    compute_transmit_w: float = 13.35  # both at once
    idle_w: float = 4.04  # waiting for the server

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "PowerModel":
        """From ``compute=13.35,transmit=4.25,both=13.35,idle=4.04`` (any subset)."""
        names = {"compute": "compute_w", "transmit": "transmit_w", "both": "compute_transmit_w", "idle": "idle_w"}
        values = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key.strip() not in names:
                raise ValueError(f"unknown power state {key!r}; use {', '.join(names)}")
            values[names[key.strip()]] = float(value)
        return cls(**values)


def robot_energy_j(compute_s: float, transmit_s: float, overlap_s: float, total_s: float,
                   power: PowerModel = PowerModel()) -> float:
    """Joules the robot spends in an inference of ``total_s`` seconds.

    ``compute_s`` and ``transmit_s`` are the times it computes and transmits, of which
    ``overlap_s`` both at once; the rest of ``total_s`` it waits idle. Inconsistent
    estimates are clamped: neither state outlasts the inference, and where the two
    together do, the excess must have overlapped.
    """
    compute_s = min(max(compute_s, 0.0), total_s)
    transmit_s = min(max(transmit_s, 0.0), total_s)
    overlap_s = min(max(overlap_s, compute_s + transmit_s - total_s, 0.0), compute_s, transmit_s)
    idle_s = total_s - compute_s - transmit_s + overlap_s
    return (power.compute_w * (compute_s - overlap_s) + power.transmit_w * (transmit_s - overlap_s)
            + power.compute_transmit_w * overlap_s + power.idle_w * idle_s)
