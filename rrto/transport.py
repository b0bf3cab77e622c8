"""The robot's end of the wire: one zmq DEALER socket to the edge server's ROUTER.

Messages that need no answer are sent and forgotten (zmq queues them); a request
waits for its reply, matched by sequence number, never longer than the timeout.
The session token from the hello handshake rides in every header. With curve keys
the link is CurveZMQ: encrypted, and the server admits only robots it knows.

A legitimate op may run long, a dead server never answers: while it waits, the link
pings every ``fault_timeout / 4`` (the server's main thread answers pings at once,
never queued behind the session's work) and raises ``LinkLost`` after
``fault_timeout`` seconds without any message from the server. Pings travel on a
connection of their own: on the request socket they would queue behind the app's
uploads (the weights take seconds on robot Wi-Fi), and a busy link is not a dead one.

Several app threads may wait at once (the runtime lets the others go on meanwhile). zmq
sockets are not thread-safe, so one thread at a time holds the right to use them: a
waiting thread takes it to poll, and hands on what it reads to the others' reply numbers;
a thread that wants to send wakes the poller through a pipe and takes its turn.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import codec
from .errors import LinkError, LinkLost, remote_error
from .keys import CurveKeys
from .stats import Stats

HOLD = contextlib.nullcontext()  # a wait that keeps what its caller holds (see ``Link.request``)
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class Link:
    def __init__(self, url: str, timeout: float, stats: Stats, curve: CurveKeys | None = None,
                 fault_timeout: float = 2.0):
        self.url, self.timeout, self.stats, self.curve = url, timeout, stats, curve
        self.fault_timeout = fault_timeout
        self._ping, self._ping_session = codec.pack({"t": "ping"}), None
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # eager streams run ahead; a sync point bounds them
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        self._pinger = self._ctx.socket(zmq.DEALER)
        self._pinger.setsockopt(zmq.LINGER, 0)
        for sock in (self._sock, self._pinger):
            if curve is not None:  # before connect: the handshake is decided when the connection opens
                sock.curve_serverkey = curve.server_public
                sock.curve_publickey = curve.public
                sock.curve_secretkey = curve.secret
        # Watch the handshake until the hello is answered: a refused key is reported at once.
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._sock.connect(url)
        self._pinger.connect(url)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._pinger, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._turn = threading.Condition(threading.Lock())  # guards what follows, and the sockets' owner
        self._using = False  # a thread uses the sockets (sends, or polls for replies)
        self._polling = False  # ... and it is the poller: a sender wakes it
        self._senders = 0  # threads waiting for their turn to send
        self._heard = 0.0  # monotonic() when the server last said anything
        self._pinged = 0.0
        self._seq = 0
        self._expected: set[int] = set()  # reply numbers reserved for replies the server sends unasked
        self._early: dict[int, tuple] = {}  # such replies, arrived before the robot asked for them
        self.session: str | None = None
        self.closed = False
        # Link samples from real traffic: a message sent after ``clock_next()`` is marked, the
        # server's next reply says how long it held it ('sv'), and (bytes up + down, round trip
        # minus that) lands in ``transfers`` when the robot was waiting as the reply came in
        # (a reply read late, after the app's own work, says nothing about the link).
        self.transfers: deque[tuple[int, float]] = deque(maxlen=64)
        self.replied_at = 0.0  # perf_counter() when the app last got a reply it waited for
        self._clock_next = False
        self._clocks = 0
        self._clocked: tuple[int, float, int] | None = None  # (number, sent at, bytes)

    def hello(self, info: dict, timeout: float | None = None) -> dict:
        """Open a session; returns the server's description of itself."""
        try:
            self._wait_handshake(self.timeout if timeout is None else timeout)
            reply, _ = self.request({"t": "hello", "v": codec.PROTOCOL_VERSION, **info}, what="the hello handshake")
        except LinkError as e:
            if "refused" in str(e):
                raise
            if self.curve is not None:
                raise LinkError(
                    f"rrto-server at {self.url} did not answer the hello within {self.timeout:g} s: is it running "
                    "with --keys, is this robot's key authorised there (its .key file in the server's "
                    "authorized/ folder) and is --server-key that server's public key?") from None
            raise LinkError(
                f"could not reach rrto-server at {self.url} within {self.timeout:g} s. "
                f"Start one with `rrto-server --listen {self.url}`, or leave out --server "
                "to use an embedded local server. A server started with --keys needs "
                "--server-key and --robot-key here.") from None
        finally:
            self._stop_monitor()
        self.session = reply["session"]
        return reply

    def _wait_handshake(self, timeout: float) -> None:
        """Wait for the zmq handshake; a server that rejects it raises LinkError now, not after a timeout.

        zmq retries refused handshakes in the background forever, so without this a robot
        with the wrong key would only ever see a timeout.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self._monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise LinkError(f"rrto-server at {self.url} refused this robot's key: add its public .key file "
                                "to the server's authorized/ folder (see `rrto keygen --help`) and restart it")
            if self.curve is None:
                raise LinkError(f"rrto-server at {self.url} refused the unencrypted link: it runs with --keys, "
                                "so give this robot --server-key and --robot-key (or RRTO_SERVER_KEY/RRTO_ROBOT_KEY)")
            raise LinkError(f"rrto-server at {self.url} refused the encrypted handshake: check that --server-key "
                            "is that server's public key and that it runs with --keys")
        raise LinkError(f"no handshake with {self.url}")

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def clock_next(self) -> None:
        """Time the next message sent and the server's next reply (see ``transfers``)."""
        self._clock_next = True

    def send(self, header: dict, frames: list = (), wait_sent: bool = False, numbered: bool = False) -> int | None:
        """Send without waiting for a reply; ``wait_sent`` blocks until zmq let go of the frames.
        ``numbered``: a request; returns the number its reply will carry (see ``await_reply``)."""
        self._take()
        trackers = []
        try:
            seq = None
            if numbered:
                with self._turn:
                    self._seq += 1
                    seq = header["q"] = self._seq
                    self._expected.add(seq)
                self.stats.round_trips += 1
            head, *rest = self._pack(header, frames)
            try:
                # The header is small: copying it is cheaper than a zero-copy zmq.Frame. Tensor
                # bytes go zero-copy; a tracker says when zmq no longer reads the app's memory.
                self._sock.send(head, zmq.SNDMORE if rest else 0)
                for i, f in enumerate(rest):
                    more = zmq.SNDMORE if i + 1 < len(rest) else 0
                    tracker = self._sock.send(f, more, copy=False, track=wait_sent)
                    if wait_sent:
                        trackers.append(tracker)
            except zmq.Again:
                raise LinkError(f"could not queue a message to {self.url} within {self.timeout:g} s") from None
        finally:
            self._give()
        try:
            for tracker in trackers:
                tracker.wait(self.timeout)
        except zmq.NotDone:
            raise LinkError(f"an upload to {self.url} did not leave within {self.timeout:g} s; "
                            "is the link down?") from None
        return seq

    def request(self, header: dict, frames: list = (), what: str = "a reply",
                aside: contextlib.AbstractContextManager = HOLD) -> tuple[dict, list]:
        """Send and wait for the matching reply; error replies raise their exception.
        ``aside``: held while waiting (the runtime lets other app threads in)."""
        seq = self.send(header, frames, numbered=True)
        with aside:
            return self.await_reply(seq, what)

    def reserve(self, n: int) -> list[int]:
        """Numbers for ``n`` replies the server will send unasked (a run ahead's answers to later waits)."""
        with self._turn:
            seqs = list(range(self._seq + 1, self._seq + 1 + n))
            self._seq += n
            self._expected.update(seqs)
            return seqs

    def forget(self, seqs) -> None:
        """Replies no longer wanted (the app turned away): dropped when they come."""
        with self._turn:
            for q in seqs:
                self._expected.discard(q)
                self._early.pop(q, None)

    def _ping_message(self) -> list:
        """A ping naming this robot's session, so that a server that does not hold it says so."""
        if self._ping_session != self.session:
            self._ping, self._ping_session = codec.pack({"t": "ping", "s": self.session}), self.session
        return self._ping

    # -- whose turn it is to use the sockets -------------------------------------------

    def _take(self) -> None:
        """The right to use the sockets, for a send: a thread polling them is woken to let go."""
        turn = self._turn
        with turn:
            if self._using:
                self._senders += 1
                try:
                    while self._using:
                        if self.closed:
                            raise LinkError("this rrto connection is closed")
                        if self._polling:
                            self._wake()
                        turn.wait()
                finally:
                    self._senders -= 1
            self._using = True

    def _give(self) -> None:
        with self._turn:
            self._using = self._polling = False
            self._turn.notify_all()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:  # (full: the poller has a wake-up waiting anyway)
            pass

    # -- replies ------------------------------------------------------------------------

    def await_reply(self, seq: int, what: str = "a reply") -> tuple[dict, list]:
        """The reply numbered ``seq``; replies numbered for other waits are kept until asked for.

        Whoever waits polls the sockets while no one else does; the others wait for it to
        hand on their replies (or to let go, when one of them polls next)."""
        turn = self._turn
        start = time.monotonic()
        every = self.fault_timeout / 4  # four pings per fault timeout
        with turn:
            self._expected.add(seq)  # (whoever polls files it for this thread)
        try:
            while True:
                with turn:
                    while True:
                        early = self._early.pop(seq, None)
                        if early is not None:
                            self.replied_at = time.perf_counter()
                            return _checked(*early)
                        if self.closed:
                            raise LinkError(f"this rrto connection closed while waiting for {what}")
                        if not self._using and not self._senders:
                            self._using = self._polling = True
                            break
                        turn.wait(every)
                        self._check_time(seq, start, what)
                try:
                    self._poll(every, what)
                finally:
                    self._give()
                with turn:
                    self._check_time(seq, start, what)
        finally:
            with turn:
                self._expected.discard(seq)  # (a late reply, after an error, is dropped)

    def _check_time(self, seq: int, start: float, what: str) -> None:
        """(holding the turn) Raise if the wait for ``seq`` has gone on too long."""
        if seq in self._early:
            return
        now = time.monotonic()
        if now - max(start, self._heard) > self.fault_timeout:
            raise LinkLost(f"no sign of life from it for {now - max(start, self._heard):.1f} s (waiting for {what})")
        if now - start > self.timeout:
            raise LinkError(
                f"no reply from rrto-server at {self.url} within {self.timeout:g} s "
                f"(waiting for {what}); it still answers pings, so an op is taking that long. "
                "Set RRTO_TIMEOUT (seconds) to wait longer.")

    def _poll(self, every: float, what: str) -> None:
        """(holding the sockets) Wait up to ``every`` s for messages; file the replies that came."""
        sock = self._sock
        waited = not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN  # else the next message came earlier
        ready = dict(self._poller.poll(int(every * 1000) + 1))
        now = time.monotonic()
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self._pinger in ready:  # pongs: the server is alive, the link carries packets
            self._heard = now
            while self._pinger.poll(0):
                if b"gone" in self._pinger.recv_multipart()[0]:
                    raise LinkLost(f"it no longer holds this robot's session (restarted, or closed it) "
                                   f"(waiting for {what})")
        if sock in ready:
            self._heard = now
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = sock.recv_multipart(copy=False)
                nbytes = sum(len(f) for f in msg)
                self.stats.bytes_received += nbytes
                reply, rframes = codec.unpack(msg)
                if "sv" in reply:
                    self._clock_reply(reply["sv"], nbytes, waited)
                waited = False
                q = reply.get("q")
                with self._turn:
                    if q in self._expected:
                        self._early[q] = (reply, rframes)
                    # else: a pong, or the late answer to a request that timed out or was forgotten
        elif now - self._pinged >= every and self._pinger not in ready:
            self._pinged = now
            try:
                self._pinger.send_multipart(self._ping_message(), zmq.NOBLOCK)
            except zmq.Again:  # not connected (yet): no sign of life either
                pass

    def _clock_reply(self, sv, nbytes: int, waited: bool) -> None:
        clocked, self._clocked = self._clocked, None
        if clocked is None or not waited or type(sv) is not list or len(sv) != 2 or sv[0] != clocked[0] \
                or type(sv[1]) not in (int, float):
            return
        seconds = time.perf_counter() - clocked[1] - float(sv[1])
        if seconds > 0:
            self.transfers.append((clocked[2] + nbytes, seconds))

    def _pack(self, header: dict, frames: list) -> list:
        if self.closed:
            raise LinkError("this rrto connection is closed (rrto.disable() was called)")
        if self.session is not None:
            header["s"] = self.session
        clock = self._clock_next
        if clock:
            self._clock_next = False
            self._clocks += 1
            header["clk"] = self._clocks
        msg = codec.pack(header, frames)
        nbytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in msg)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += nbytes
        if clock:
            self._clocked = (self._clocks, time.perf_counter(), nbytes)
        return msg

    def close(self, linger: float = 1.0) -> None:
        """Close the socket, giving queued messages (the goodbye) ``linger`` seconds to leave.
        A thread waiting for a reply (another app thread) is woken and raises LinkError."""
        with self._turn:
            if self.closed:
                return
            self.closed = True
            while self._using:
                if self._polling:
                    self._wake()
                self._turn.wait()
            self._using = True  # for good: no one uses the sockets again
            self._turn.notify_all()
        self._stop_monitor()
        self._pinger.close(linger=0)
        self._sock.close(linger=int(linger * 1000))
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _checked(reply: dict, frames: list) -> tuple[dict, list]:
    if reply.get("t") == "err":
        raise remote_error(reply.get("kind", ""), reply.get("msg", "unknown server error"))
    return reply, frames
