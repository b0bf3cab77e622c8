"""Measure an emulated link: round-trip time and throughput each way, over plain TCP.

    python -m benchmarks.netcheck sink --listen 10.77.0.2:0      # on the server side
    python -m benchmarks.netcheck probe --to HOST:PORT --bytes 4000000   # on the robot side

The harness runs this once per shaped link before benchmarking on it (its self-check),
and the tests use it to show that the relay adds the RTT it was given and that the
shaping holds throughput to the configured rate.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import threading
import time

BLOCK = 64 * 1024


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), BLOCK))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _serve(conn: socket.socket) -> None:
    """Commands: b'p' + 63 bytes -> echo them; b'u' + n -> swallow n bytes, answer b'k'; b'd' + n -> send n."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            cmd = conn.recv(1)
            if not cmd:
                return
            if cmd == b"p":
                conn.sendall(b"p" + _recv_exact(conn, 63))
            elif cmd in (b"u", b"d"):
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                if cmd == b"u":
                    while n:
                        n -= len(_recv_exact(conn, min(n, BLOCK)))
                    conn.sendall(b"k")
                else:
                    block = bytes(BLOCK)
                    while n:
                        conn.sendall(block[:min(n, BLOCK)])
                        n -= min(n, BLOCK)
            else:
                return
    except OSError:
        pass
    finally:
        conn.close()


class Sink:
    """The far end of a probe, serving each connection in a thread."""

    def __init__(self, listen: tuple[str, int]):
        self.sock = socket.create_server(listen)
        self.address = self.sock.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def probe(address: tuple[str, int], nbytes: int = 4_000_000, pings: int = 10) -> dict:
    """Median ping-pong RTT (ms), then upload and download throughput (Mbit/s) of ``nbytes``."""
    with socket.create_connection(address, timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(b"p" + bytes(63))
            _recv_exact(s, 64)
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        # Each transfer's elapsed time includes one round trip of the command and the answer:
        # take it off, so that the figure is the rate the bytes themselves moved at.
        payload = bytes(BLOCK)
        t0 = time.perf_counter()
        s.sendall(b"u" + struct.pack("!Q", nbytes))
        left = nbytes
        while left:
            s.sendall(payload[:min(left, BLOCK)])
            left -= min(left, BLOCK)
        _recv_exact(s, 1)
        up_s = time.perf_counter() - t0 - rtt
        t0 = time.perf_counter()
        s.sendall(b"d" + struct.pack("!Q", nbytes))
        left = nbytes
        while left:
            left -= len(_recv_exact(s, min(left, BLOCK)))
        down_s = time.perf_counter() - t0 - rtt
    return {"rtt_ms": rtt * 1e3, "rtt_min_ms": min(rtts) * 1e3, "bytes": nbytes,
            "up_mbit": nbytes * 8 / max(up_s, 1e-6) / 1e6, "down_mbit": nbytes * 8 / max(down_s, 1e-6) / 1e6}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.netcheck", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sink", help="answer probes until SIGTERM (or until the parent exits)")
    s.add_argument("--listen", default="127.0.0.1:0")
    q = sub.add_parser("probe", help="measure RTT and throughput to a sink; prints JSON")
    q.add_argument("--to", required=True, metavar="HOST:PORT")
    q.add_argument("--bytes", type=int, default=4_000_000)
    q.add_argument("--pings", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(_address(args.to), args.bytes, args.pings)))
        return 0
    sink = Sink(_address(args.listen))
    print(f"sink {sink.address[0]}:{sink.address[1]}", flush=True)
    parent = os.getppid()
    try:
        while os.getppid() == parent:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
