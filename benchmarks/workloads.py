"""The models a benchmark runs, by name: which example app, with which arguments.

    resnet18[:SIZE]  resnet50[:SIZE]  vgg11[:SIZE]  mobilenet_v2[:SIZE]   camera_loop.py (224)
    keypoint[:HxW]                                                         keypoint_loop.py (384x640)
    scene[:ZxYxX]                                                          scene_completion.py (16x128x128)

Each also says what the hand-written offload (``direct``) computes on the server, which
is the app's own per-frame code from the upload of the input to the result it reads
back, built from the same models, seed and inputs so that the outputs are the same.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CLASSIFIERS = ("resnet18", "resnet50", "vgg11", "mobilenet_v2")


@dataclass(frozen=True)
class Workload:
    name: str  # as the user wrote it, e.g. "keypoint:192x320"
    kind: str  # "classifier", "keypoint" or "scene"
    dims: tuple[int, ...]  # image size, (height, width) or (z, y, x)
    seed: int = 0

    @property
    def script(self) -> str:
        return {"classifier": "camera_loop.py", "keypoint": "keypoint_loop.py", "scene": "scene_completion.py"}[self.kind]

    def app_args(self, frames: int) -> list[str]:
        """The app and its arguments, for ``python -m rrto ... <these>``."""
        app = f"examples/{self.script}"
        if self.kind == "classifier":
            return [app, "--arch", self.name.split(":")[0], "--size", str(self.dims[0]), "--frames", str(frames)]
        if self.kind == "keypoint":
            return [app, "--height", str(self.dims[0]), "--width", str(self.dims[1]), "--frames", str(frames)]
        return [app, "--grid", *map(str, self.dims), "--steps", str(frames)]

    def inputs(self, frames: int):
        """The app's own input tensors, frame by frame (what it uploads)."""
        _import_examples()
        if self.kind == "classifier":
            from camera_loop import camera_frames
            return camera_frames(frames, self.dims[0], self.seed)
        if self.kind == "keypoint":
            import keypoint_loop
            return keypoint_loop.frames(frames, *self.dims, self.seed)
        from scene_completion import lidar_grids
        return lidar_grids(frames, *self.dims, self.seed)

    def server_step(self, device) -> Callable:
        """What the app does per frame on the GPU, as one function: input tensor -> results it reads back."""
        import torch
        _import_examples()
        import models

        torch.manual_seed(self.seed)  # as the app does before building its model
        if self.kind == "classifier":
            model = models.randomize_norms(models.CLASSIFIERS[self.name.split(":")[0]](), self.seed).eval().to(device)
            mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

            def step(frame):
                x = frame.to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255)
                logits = model((x - mean) / std)
                return [logits, logits.softmax(-1).topk(5).indices[0]]
        elif self.kind == "keypoint":
            model = models.randomize_norms(models.KeypointNet(), self.seed).eval().to(device)

            def step(frame, conf=0.51, top=20):  # keypoint_loop.py's defaults
                pred = model(frame.to(device).permute(2, 0, 1)[None].float() / 255.0)[0]
                confident = pred[pred[:, 4] > conf]
                people = confident[confident[:, 4].argsort(descending=True)[:top]]
                return [people]
        else:
            classes = 20  # scene_completion.py's default
            model = models.randomize_norms(models.SceneCompletionNet(classes), self.seed).eval().to(device)
            class_ids = torch.arange(classes, device=device)

            def step(grid):
                labels = model(grid.to(device)).argmax(1)[0]
                per_class = (labels.unsqueeze(-1) == class_ids).sum((0, 1, 2))
                return [per_class, torch.nonzero(labels >= classes // 2)]
        return step


def parse_workload(spec: str) -> Workload:
    name, _, size = spec.partition(":")
    try:
        dims = tuple(int(d) for d in size.split("x")) if size else ()
    except ValueError:
        dims = (-1,)
    if name in CLASSIFIERS:
        dims = dims or (224,)
        kind, need = "classifier", 1
    elif name == "keypoint":
        dims = dims or (384, 640)
        kind, need = "keypoint", 2
    elif name == "scene":
        dims = dims or (16, 128, 128)
        kind, need = "scene", 3
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(CLASSIFIERS)}, keypoint, scene")
    if len(dims) != need or min(dims) < 8:
        raise ValueError(f"model {spec!r}: give the size as {['SIZE', 'HxW', 'ZxYxX'][need - 1]}, e.g. "
                         f"{['resnet18:160', 'keypoint:192x320', 'scene:8x64x64'][need - 1]}")
    return Workload(spec, kind, dims)


def _import_examples() -> None:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
