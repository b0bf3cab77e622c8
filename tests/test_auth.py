"""CurveZMQ on the robot-edge link: keys, who gets in, and that the bytes on the wire are sealed."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import zmq

import rrto
from rrto import codec
from rrto.keys import keygen as make_keys

from .conftest import ROOT, RawClient, ServerProcess, run_rrto

# 16 recognisable bytes, repeated: if they cross the wire in clear, a capture finds them.
PATTERN = b"rrto-PLAINTEXT!\x7f"


def keygen(*args: str) -> subprocess.CompletedProcess:
    return run_rrto("keygen", *args, timeout=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    good, other = base / "good", base / "other"
    make_keys(good)
    make_keys(other)  # a well-formed pair the server never authorised
    return good, other


@pytest.fixture(scope="module")
def keyed(keys):
    s = ServerProcess("--keys", str(keys[0]), "--log-level", "info")
    yield s
    assert s.alive(), "the keyed server died during the tests"
    s.stop()
    assert not any("Traceback" in line for line in s.log), "".join(s.log)


def small_net_matches_local(**enable) -> None:
    """rrto enabled with these arguments runs a conv net with results equal to local."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
        rrto.enable(mode="eager", **enable)
        try:
            got = net.cuda()(x.cuda()).cpu()  # the net's parameters are remote from here on
        finally:
            rrto.disable()
    assert torch.equal(got, expected)


def curve_client(url: str, server_key, robot_key=None) -> RawClient:
    """A raw client whose socket speaks CurveZMQ with the given key files (not yet connected)."""
    c = RawClient.__new__(RawClient)
    c.ctx, c.timeout_ms, c.session, c.seq = zmq.Context(), 2000, None, 0
    c.sock = c.ctx.socket(zmq.DEALER)
    c.sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        from rrto.keys import load_pair, load_public
        c.sock.curve_serverkey = load_public(server_key)
        c.sock.curve_publickey, c.sock.curve_secretkey = load_pair(robot_key)
    c.sock.connect(url)
    return c


def test_keygen_writes_the_documented_layout(tmp_path):
    d = tmp_path / "k"
    res = keygen(str(d))
    assert res.returncode == 0, res.stderr
    names = {"server.key", "server.key_secret", "robot.key", "robot.key_secret", "authorized"}
    assert set(os.listdir(d)) == names
    assert os.listdir(d / "authorized") == ["robot.key"]
    assert (d / "authorized" / "robot.key").read_bytes() == (d / "robot.key").read_bytes()
    assert (d / "robot.key_secret").stat().st_mode & 0o077 == 0  # secrets readable by their owner only
    assert (d / "server.key_secret").stat().st_mode & 0o077 == 0
    server_secret = (d / "server.key_secret").read_bytes()
    make_keys(d, "arm2")  # a second robot; the server's pair stays
    assert (d / "authorized" / "arm2.key").exists()
    assert (d / "server.key_secret").read_bytes() == server_secret
    with pytest.raises(FileExistsError, match="already exists"):
        make_keys(d, "arm2")
    res = keygen("--help")
    assert res.returncode == 0 and "authorized/NAME.key" in res.stdout and "--server-key" in res.stdout


def test_an_app_named_keygen_still_runs(tmp_path):
    (tmp_path / "keygen").write_text("import torch; print('app ran', torch.ones(2).cuda().sum().item())\n")
    res = subprocess.run([sys.executable, "-m", "rrto", "keygen"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "RRTO_MODE": "local"})
    assert res.returncode == 0 and "app ran 2.0" in res.stdout, res.stderr


def test_authorised_robot_gets_correct_results(keyed, keys):
    good = keys[0]
    small_net_matches_local(server=keyed.url, server_key=str(good / "server.key"),
                            robot_key=str(good / "robot.key_secret"))
    # the same through the command line flags of an unmodified app
    app = "import torch; x = torch.arange(5.0).cuda(); print('sum', (x * x).sum().item())"
    res = subprocess.run([sys.executable, "-m", "rrto", "--server", keyed.url, "--server-key", str(good / "server.key"),
                          "--robot-key", str(good / "robot.key"), "--timeout", "20", "app.py"],
                         cwd=_write_app(good.parent, app), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "sum 30.0" in res.stdout, res.stderr


def _write_app(folder, source: str):
    (folder / "app.py").write_text(source + "\n")
    return folder


def test_unauthorised_robot_cannot_run_a_single_op(keyed, keys):
    good, other = keys
    t0 = time.monotonic()
    with pytest.raises(rrto.LinkError, match="refused this robot's key"):
        rrto.enable(server=keyed.url, server_key=str(good / "server.key"),
                    robot_key=str(other / "robot.key_secret"), timeout=10)
    assert time.monotonic() - t0 < 10, "the refusal should come before the timeout"
    assert rrto.current() is None
    # At the socket level: the hello and an op sent anyway get no answer at all.
    c = curve_client(keyed.url, good / "server.key", other / "robot.key_secret")
    try:
        c.send({"t": "hello", "v": codec.PROTOCOL_VERSION, "q": 1})
        c.send({"t": "op", "op": "aten::ones.default", "a": [[4]], "o": [1], "q": 2})
        assert not c.sock.poll(1500)
    finally:
        c.close()
    small_net_matches_local(server=keyed.url, server_key=str(good / "server.key"),
                            robot_key=str(good / "robot.key_secret"))  # the good robot is still served


def test_unauthorised_robot_via_environment(keyed, keys):
    good, other = keys
    app = "import torch; print(torch.ones(3).cuda().sum().item())"
    res = subprocess.run([sys.executable, "-m", "rrto", "app.py"], cwd=_write_app(other, app), capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "RRTO_SERVER": keyed.url, "RRTO_TIMEOUT": "20",
                              "RRTO_SERVER_KEY": str(good / "server.key"),
                              "RRTO_ROBOT_KEY": str(other / "robot.key_secret")})
    assert res.returncode == 2 and "refused this robot's key" in res.stderr and "Traceback" not in res.stderr


def test_robot_without_curve_gets_nothing(keyed, keys):
    c = curve_client(keyed.url, None)
    try:
        c.send({"t": "hello", "v": codec.PROTOCOL_VERSION, "q": 1})
        c.send({"t": "op", "op": "aten::ones.default", "a": [[4]], "o": [1], "q": 2})
        assert not c.sock.poll(1500)
    finally:
        c.close()
    with pytest.raises(rrto.LinkError, match="refused the unencrypted link"):
        rrto.enable(server=keyed.url, timeout=10)
    with pytest.raises(rrto.LinkError, match="refused the encrypted handshake"):  # a wrong server key
        rrto.enable(server=keyed.url, server_key=str(keys[1] / "server.key"),
                    robot_key=str(keys[0] / "robot.key_secret"), timeout=10)


def test_keys_need_a_server_and_both_files(keys):
    with pytest.raises(ValueError, match="give its address"):
        rrto.enable(server_key=str(keys[0] / "server.key"), robot_key=str(keys[0] / "robot.key_secret"))
    with pytest.raises(ValueError, match="needs both"):
        rrto.enable(server="tcp://127.0.0.1:9", server_key=str(keys[0] / "server.key"))
    with pytest.raises(ValueError, match="holds no secret key"):
        rrto.enable(server="tcp://127.0.0.1:9", server_key=str(keys[0] / "server.key"),
                    robot_key=str(keys[0] / "authorized" / "robot.key"))
    assert rrto.current() is None


class Relay:
    """A TCP relay on loopback that records every byte passing between robot and server."""

    def __init__(self, target_url: str):
        host, port = target_url.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        while not self.stopping:
            ready, _, _ = select.select([self.listener, *pairs], [], [], 0.1)
            for s in ready:
                if s is self.listener:
                    a, _ = self.listener.accept()
                    b = socket.create_connection(self.target)
                    pairs[a], pairs[b] = b, a
                    continue
                data = s.recv(1 << 16)
                if data:
                    self.captured += data
                    pairs[s].sendall(data)
                else:  # one side closed: close both
                    peer = pairs.pop(s)
                    pairs.pop(peer, None)
                    s.close()
                    peer.close()
        for s in [self.listener, *pairs]:
            s.close()

    def stop(self) -> bytes:
        self.stopping = True
        self.thread.join(5)
        return bytes(self.captured)


def capture(server_url: str, **enable) -> bytes:
    """The bytes on the wire while a robot uploads a PATTERN tensor and downloads a copy of it."""
    relay = Relay(server_url)
    try:
        x = torch.frombuffer(bytearray(PATTERN * 256), dtype=torch.uint8)
        rrto.enable(server=relay.url, mode="eager", timeout=20, **enable)
        try:
            y = x.cuda().clone().cpu()
        finally:
            rrto.disable()
        assert torch.equal(x, y)
    finally:
        wire = relay.stop()
    assert len(wire) > len(PATTERN) * 256 * 2, "the relay saw too little traffic to judge"
    return wire


def test_traffic_is_encrypted(keyed, keys):
    plain_server = ServerProcess()
    try:
        clear = capture(plain_server.url)
    finally:
        plain_server.stop()
    assert PATTERN * 4 in clear  # without keys the tensor is readable on the wire: the check can fail
    good = keys[0]
    sealed = capture(keyed.url, server_key=str(good / "server.key"), robot_key=str(good / "robot.key_secret"))
    assert PATTERN not in sealed and PATTERN[:8] not in sealed


def test_no_keys_means_loopback_unless_insecure(keys):
    for listen in ("tcp://0.0.0.0:0", "tcp://*:0", "tcp://robot-lan.example:5555"):
        res = subprocess.run([sys.executable, "-m", "server", "--listen", listen, "--device", "cpu"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--keys DIR" in res.stderr and "--insecure" in res.stderr, res.stderr
    for extra in (["--insecure"], ["--keys", str(keys[0])]):
        s = ServerProcess("--listen", "tcp://0.0.0.0:0", *extra)
        try:
            assert s.alive() and ":" in s.url
        finally:
            assert s.stop() == 0
    res = subprocess.run([sys.executable, "-m", "server", "--keys", str(keys[0] / "nowhere")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "rrto keygen" in res.stderr
