"""Camera loop: classify camera frames with a ResNet on the GPU, one frame at a time.

An ordinary CUDA PyTorch app (it knows nothing about rrto). Frames are synthetic
224x224 RGB images (a moving object over a fixed background), handed over as
uint8 HxWx3 arrays, as a camera driver gives them. Offload it with:

    python -m rrto examples/camera_loop.py
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from frame_timer import FrameTimer
from models import CLASSIFIERS, randomize_norms


def camera_frames(n: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    background = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    for i in range(n):
        frame = background.clone()
        y, x = (17 * i) % (size - 48), (29 * i) % (size - 48)
        frame[y:y + 48, x:x + 48] = torch.tensor([250, 40, 40], dtype=torch.uint8)
        yield frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", choices=sorted(CLASSIFIERS))
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write every frame's logits to this .npz file")
    p.add_argument("--timings", help="write each frame's wall and CPU time to this JSON file")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}")
    model = randomize_norms(CLASSIFIERS[args.arch](), args.seed).eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    logits_per_frame, latencies, timer = [], [], FrameTimer(args.timings)
    with torch.inference_mode():
        for i, frame in enumerate(camera_frames(args.frames, args.size, args.seed)):
            timer.start()
            x = frame.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float().div_(255)
            logits = model((x - mean) / std)
            top5 = logits.softmax(-1).topk(5).indices[0].tolist()
            latencies.append(timer.stop())
            print(f"frame {i:3d}: {latencies[-1] * 1e3:8.1f} ms   top-5 classes {top5}")
            if args.save:
                logits_per_frame.append(logits.cpu().numpy())
    if len(latencies) > 1:
        print(f"median latency after the first frame: {np.median(latencies[1:]) * 1e3:.1f} ms")
    timer.write()
    if args.save:
        np.savez(args.save, logits=np.concatenate(logits_per_frame))


if __name__ == "__main__":
    main()
