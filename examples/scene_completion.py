"""3-D scene completion loop: complete a robot's voxel map of its surroundings.

An ordinary CUDA PyTorch app in the spirit of AGRNav's SCONet: each step a partial
occupancy grid (what the LiDAR saw: ground, walls, obstacles, with holes) goes
through a 3-D convolutional encoder-decoder that predicts a class per voxel; the
planner then reads the occupied voxels. AGRNav uses a 32x256x256 grid; the default
here is 16x128x128 to keep a CPU server interactive. Offload it with:

    python -m rrto examples/scene_completion.py
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from frame_timer import FrameTimer
from models import SceneCompletionNet, randomize_norms


def lidar_grids(n: int, z: int, y: int, x: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grid = torch.zeros(z, y, x)
        grid[0] = 1.0  # ground
        for _ in range(6):  # boxes: obstacles and walls
            z1, y0, x0 = [int(torch.randint(1, m, (1,), generator=g)) for m in (z, y - 4, x - 4)]
            grid[:z1, y0:y0 + 4, x0:x0 + 8] = 1.0
        seen = torch.rand(z, y, x, generator=g) > 0.4  # the sensor misses ~40% of it
        yield (grid * seen)[None, None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grid", type=int, nargs=3, default=[16, 128, 128], metavar=("Z", "Y", "X"))
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write logits and predicted classes to this .npz file")
    p.add_argument("--timings", help="write each step's wall and CPU time to this JSON file")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = randomize_norms(SceneCompletionNet(args.classes), args.seed).eval().to(device)
    classes = torch.arange(args.classes, device=device)
    saved, timer = {}, FrameTimer(args.timings)
    with torch.inference_mode():
        for i, grid in enumerate(lidar_grids(args.steps, *args.grid, args.seed)):
            timer.start()
            logits = model(grid.cuda(non_blocking=True))
            labels = logits.argmax(1)[0]  # (Z, Y, X)
            per_class = (labels.unsqueeze(-1) == classes).sum((0, 1, 2))
            occupied = torch.nonzero(labels >= args.classes // 2)  # obstacle classes: the planner avoids them
            counts = per_class.cpu().tolist()
            dt = timer.stop()
            print(f"step {i:3d}: {dt * 1e3:8.1f} ms   {occupied.shape[0]} obstacle voxels, "
                  f"largest class {int(np.argmax(counts))}")
            if args.save:
                saved[f"logits{i}"] = logits.cpu().numpy()
                saved[f"occupied{i}"] = occupied.cpu().numpy()
    timer.write()
    if args.save:
        np.savez(args.save, **saved)


if __name__ == "__main__":
    main()
