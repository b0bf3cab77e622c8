"""Someone else's app: a robot's visual front end written with kornia (grey, blur, Harris
corners and their count, Sobel edges, a Laplacian, a perspective warp, a resize and a
homography inverse), a loop over camera frames on "cuda". It saves every output.

    python kornia_app.py --frames 12 --save out.npz
"""
from __future__ import annotations

import argparse

import kornia as K
import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--save", help="write every output to this .npz")
    a = p.parse_args()
    dev = torch.device("cuda")
    homography = torch.tensor([[[1.0, 0.05, 2.0], [-0.03, 1.0, -1.0], [1e-4, 2e-4, 1.0]]], device=dev)
    outs = {}
    with torch.no_grad():
        for i in range(a.frames):
            img = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(i)).to(dev)
            gray = K.color.rgb_to_grayscale(img)
            response = K.feature.harris_response(K.filters.gaussian_blur2d(gray, (5, 5), (1.5, 1.5)))
            corners = int((K.geometry.subpix.nms2d(response, (5, 5)) > 1e-4).sum().item())
            frame = {
                "response": response, "corners": torch.tensor(corners),
                "edges": K.filters.sobel(gray), "laplacian": K.filters.laplacian(gray, 3),
                "warped": K.geometry.transform.warp_perspective(img, homography, (64, 96)),
                "small": K.geometry.transform.resize(img, (32, 48)), "inverse": torch.linalg.inv(homography),
            }
            outs.update({f"{k}{i}": v.cpu().numpy() for k, v in frame.items()})
    if a.save:
        np.savez(a.save, **outs)


if __name__ == "__main__":
    main()
