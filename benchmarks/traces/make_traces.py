"""Write the link traces indoor.csv and outdoor.csv (time_s,rate_mbit), deterministically.

    python benchmarks/traces/make_traces.py     # rewrites both files and the table in README.md

Synthetic, seeded, so anyone regenerates the same bytes. They follow the shape of the
Wi-Fi traces in the Intra-DP paper: indoor ~93 Mbit/s with mild fluctuation; outdoor
~73 Mbit/s with frequent deep drops toward 0 (the robot behind an obstacle or at the
edge of coverage). One row every 0.2 s, 120 s long; the harness loops them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STEP_S, LENGTH_S = 0.2, 120.0


def ar1(rng: np.random.Generator, n: int, sd: float, keep: float) -> np.ndarray:
    """Slowly varying noise: each step keeps ``keep`` of the last value; stationary s.d. ``sd``."""
    x, out = 0.0, np.empty(n)
    for i in range(n):
        x = keep * x + rng.normal(0.0, sd * np.sqrt(1 - keep**2))
        out[i] = x
    return out


def indoor(n: int) -> np.ndarray:
    rng = np.random.default_rng(93)
    rate = 93.0 + ar1(rng, n, 9.0, 0.9)
    rate = np.clip(rate, 55.0, 125.0)
    return rate - rate.mean() + 93.0


def outdoor(n: int) -> np.ndarray:
    rng = np.random.default_rng(73)
    base = np.clip(1.0 + ar1(rng, n, 0.3, 0.85), 0.25, 2.0)
    drop = np.zeros(n, bool)
    i = 0
    while i < n:  # a drop starts on average every 4 s and lasts 0.4-1.6 s
        if rng.random() < STEP_S / 4.0:
            k = int(rng.integers(2, 9))
            drop[i:i + k] = True
            i += k
        i += 1
    low = rng.uniform(0.3, 5.0, n)
    scale = (73.0 * n - low[drop].sum()) / base[~drop].sum()  # the mean comes out at 73 Mbit/s
    return np.where(drop, low, base * scale)


def stats(rate: np.ndarray) -> dict:
    return {"mean": rate.mean(), "p10": np.percentile(rate, 10), "p90": np.percentile(rate, 90),
            "min": rate.min(), "below5": (rate < 5.0).mean()}


def main() -> None:
    n = int(round(LENGTH_S / STEP_S))
    rows = []
    for name, make in (("indoor", indoor), ("outdoor", outdoor)):
        rate = make(n)
        with open(HERE / f"{name}.csv", "w") as f:
            f.write("time_s,rate_mbit\n")
            for i, r in enumerate(rate):
                f.write(f"{i * STEP_S:.1f},{r:.2f}\n")
        s = stats(np.round(rate, 2))
        rows.append(f"| `{name}` | {s['mean']:.1f} | {s['p10']:.1f} | {s['p90']:.1f} | {s['min']:.2f} "
                    f"| {s['below5'] * 100:.1f} % |")
    table = ("| trace | mean Mbit/s | p10 | p90 | min | time below 5 Mbit/s |\n"
             "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    readme = HERE / "README.md"
    text = readme.read_text()
    text = re.sub(r"<!-- stats -->.*<!-- /stats -->", f"<!-- stats -->\n{table}<!-- /stats -->", text, flags=re.S)
    readme.write_text(text)
    print(table, end="")


if __name__ == "__main__":
    main()
