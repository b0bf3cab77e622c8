"""Keypoint detector loop: find people and their 17 body keypoints in 640x384 frames.

An ordinary CUDA PyTorch app in the spirit of KAPAO (keypoints and poses as objects):
a one-stage detector predicts, per anchor, an objectness, a box and 17 keypoints; the
robot keeps confident detections (a data-dependent boolean mask) and the best few.
Offload it with:

    python -m rrto examples/keypoint_loop.py
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from frame_timer import FrameTimer
from models import KeypointNet, randomize_norms


def frames(n: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--conf", type=float, default=0.51, help="objectness threshold")
    p.add_argument("--top", type=int, default=20, help="detections kept per frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write raw predictions and kept detections to this .npz file")
    p.add_argument("--timings", help="write each frame's wall and CPU time to this JSON file")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = randomize_norms(KeypointNet(), args.seed).eval().to(device)
    saved, timer = {}, FrameTimer(args.timings)
    with torch.no_grad():
        for i, frame in enumerate(frames(args.frames, args.height, args.width, args.seed)):
            timer.start()
            x = frame.to(device).permute(2, 0, 1)[None].float() / 255.0
            pred = model(x)[0]  # (anchors, 5 + 3 * 17)
            confident = pred[pred[:, 4] > args.conf]  # boolean mask: the count depends on the data
            order = confident[:, 4].argsort(descending=True)[: args.top]
            people = confident[order]
            boxes, keypoints = people[:, :4].cpu(), people[:, 5:].view(-1, 17, 3).cpu()
            dt = timer.stop()
            print(f"frame {i:3d}: {dt * 1e3:8.1f} ms   {len(confident):5d} candidates, "
                  f"{len(boxes)} people kept, best at {boxes[0].round().tolist() if len(boxes) else None}")
            if args.save:
                saved[f"pred{i}"] = pred.cpu().numpy()
                saved[f"people{i}"] = people.cpu().numpy()
                saved[f"keypoints{i}"] = keypoints.numpy()
    timer.write()
    if args.save:
        np.savez(args.save, **saved)


if __name__ == "__main__":
    main()
