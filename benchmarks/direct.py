"""``direct``: hand-written, non-transparent offload, the figure transparent modes aim for.

    python -m benchmarks.direct serve --model resnet18 --listen tcp://10.77.0.2:0 [--device auto]
    python -m benchmarks.direct robot --server URL --model resnet18 --frames 20 [--timings T] [--stats S] [--save O]

What a robotics engineer writes by hand: the server loads the model and runs the app's
per-frame code; the robot sends each input tensor and gets the results back, one
request and one reply per inference. It uses rrto's wire format (``rrto.codec``: a
JSON header plus raw tensor frames, nothing executable) over a zmq DEALER/ROUTER pair,
as rrto itself does, so the difference to rrto's modes is the protocol, not the plumbing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import zmq

from rrto import codec

from .workloads import parse_workload

MAX_BYTES = 1 << 30


def serve(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("direct server: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    workload = parse_workload(args.model)
    step = workload.server_step(device)
    (example,) = [x for x in workload.inputs(1)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    listen = args.listen[:-2] + ":*" if args.listen.endswith(":0") else args.listen
    sock.bind(listen)
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    print(f"direct server listening on {endpoint} (device {device}, torch {torch.__version__}, model {args.model})",
          flush=True)
    hello = {"t": "hello", "device": str(device), "torch": torch.__version__, "model": args.model}
    parent = os.getppid()
    while os.getppid() == parent:  # exit with the harness, even a killed one
        if not sock.poll(500):
            continue
        identity, *msg = sock.recv_multipart(copy=False)
        header: dict = {}
        try:
            header, frames = codec.unpack(msg)
            q = header.get("q")
            if header.get("t") == "hello":
                reply, out = {**hello, "q": q}, []
            elif header.get("t") == "infer":
                x = codec.frame_tensor(header.get("in"), frames[0] if frames else b"", MAX_BYTES)
                if x.dtype != example.dtype or x.shape != example.shape:
                    raise codec.CodecError(f"expected a {example.dtype} input of shape {list(example.shape)}, "
                                           f"got {x.dtype} {list(x.shape)}")
                with torch.inference_mode():
                    results = [r.cpu() for r in step(x)]
                descs, out = [], []
                for r in results:
                    desc, buf, _ = codec.tensor_frame(r)
                    descs.append(desc)
                    out.append(buf)
                reply = {"t": "out", "q": q, "out": descs}
            else:
                raise codec.CodecError(f"unknown request {str(header.get('t'))[:20]!r}")
        except (codec.CodecError, IndexError, TypeError, RuntimeError) as e:  # a bad request: say so, serve on
            reply, out = {"t": "err", "q": header.get("q"), "msg": str(e)[:500]}, []
        sock.send_multipart([identity, *codec.pack(reply, out)], copy=False)
    sock.close(0)
    ctx.term()
    return 0


def robot(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    workload = parse_workload(args.model)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.server)
    counts = {"messages_sent": 0, "round_trips": 0, "bytes_sent": 0, "bytes_received": 0}

    def request(header: dict, frames: list = ()) -> tuple[dict, list]:
        msg = codec.pack(header, list(frames))
        sock.send_multipart(msg, copy=False)
        counts["messages_sent"] += 1
        counts["round_trips"] += 1
        counts["bytes_sent"] += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in msg)
        if not sock.poll(int(args.timeout * 1000)):
            raise SystemExit(f"direct robot: no reply from {args.server} within {args.timeout:g} s")
        reply_msg = sock.recv_multipart(copy=False)
        counts["bytes_received"] += sum(len(f) for f in reply_msg)
        reply, rframes = codec.unpack(reply_msg)
        if reply.get("t") == "err":
            raise SystemExit(f"direct robot: the server refused the request: {reply.get('msg')}")
        return reply, rframes

    started = time.perf_counter()
    info, _ = request({"t": "hello", "q": 0, "model": args.model})
    if info.get("model") != args.model:
        raise SystemExit(f"direct robot: the server runs {info.get('model')!r}, not {args.model!r}")
    timings, inferences, saved = [], [], {}
    for i, x in enumerate(workload.inputs(args.frames)):
        before = dict(counts)
        t0, c0 = time.perf_counter(), time.process_time()
        desc, buf, _ = codec.tensor_frame(x)
        reply, frames = request({"t": "infer", "q": i + 1, "in": desc}, [buf])
        results = [codec.frame_tensor(d, f, MAX_BYTES) for d, f in zip(reply["out"], frames)]
        wall = time.perf_counter() - t0
        timings.append({"wall_s": wall, "cpu_s": time.process_time() - c0})
        inferences.append({k: counts[k] - before[k] for k in counts})
        print(f"frame {i:3d}: {wall * 1e3:8.1f} ms   {len(results)} results", flush=True)
        if args.save:
            for j, r in enumerate(results):
                saved[f"out{j}_{i}"] = r.numpy()
    if args.timings:
        with open(args.timings, "w") as f:
            json.dump({"frames": timings}, f)
    if args.stats:  # the shape of rrto's --stats file, plus per-inference counts
        with open(args.stats, "w") as f:
            json.dump({"mode": "direct", "server": args.server, **counts, "uploads": len(timings),
                       "downloads": len(timings), "robot_torch": torch.__version__, "server_torch": info["torch"],
                       "server_device": info["device"], "wall_s": time.perf_counter() - started,
                       "inferences": inferences}, f, indent=2)
    if args.save:
        np.savez(args.save, **saved)
    sock.close(0)
    ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.direct", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="load the model and answer inference requests")
    s.add_argument("--model", required=True, help="a benchmark model name, e.g. resnet18:160 (see workloads.py)")
    s.add_argument("--listen", default="tcp://127.0.0.1:0")
    s.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    r = sub.add_parser("robot", help="send the app's inputs, one request per frame")
    r.add_argument("--server", required=True)
    r.add_argument("--model", required=True)
    r.add_argument("--frames", type=int, default=20)
    r.add_argument("--timeout", type=float, default=60.0)
    r.add_argument("--timings", help="per-frame wall and CPU time, as the example apps write them")
    r.add_argument("--stats", help="counters as JSON, like rrto's --stats")
    r.add_argument("--save", help="every frame's results, to this .npz file")
    args = p.parse_args(argv)
    return serve(args) if args.cmd == "serve" else robot(args)


if __name__ == "__main__":
    sys.exit(main())
