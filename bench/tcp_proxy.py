"""A loopback TCP proxy that can cut the line: the fault injector of the fault tests and the fault soak.

:class:`TcpProxy` listens on ``127.0.0.1:<port>`` and relays every connection to an upstream address
(Redis, here) from one thread (``selectors``). Point the clients under test at the proxy's port and the
observers at the real server; then:

* ``cut("reset")``: every relayed connection is closed at once (with RST), and while the cut lasts a
  new connection is accepted and closed straight away: clients see "connection reset" / "closed";
* ``cut("blackhole")``: nothing is relayed any more, in either direction, and new connections are
  accepted but never connected upstream: clients see commands that never answer (their socket
  timeouts fire). Ending it closes every connection made or stalled during the cut (the state a real
  partition leaves behind), so nothing buffered during the cut is delivered late;
* ``restore()``: relay again.

Limits: loopback only (it connects to the upstream with a 2 s timeout), one thread for all traffic
(enough for the tests and the soak; not a benchmark tool), no TLS awareness (it relays bytes).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator

CUT_MODES = ("reset", "blackhole")


class TcpProxy:
    """Relays ``127.0.0.1:port`` to ``upstream``; :meth:`cut` and :meth:`restore` (see the module doc)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._peer: dict[socket.socket, socket.socket | None] = {}  # both ends of each relayed pair
        self._mode: str | None = None  # None: relaying; else the cut mode
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str | None, threading.Event]] = []
        self._running = True
        self.cuts = 0
        self.relayed_connections = 0
        self._thread = threading.Thread(target=self._loop, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control (any thread)
    def url(self, scheme: str = "redis", path: str = "") -> str:
        """``<scheme>://127.0.0.1:<port><path>``, e.g. ``url(path="/12")`` for Redis database 12."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    def cut(self, mode: str = "reset") -> None:
        """Start a cut (``reset`` or ``blackhole``); returns once the proxy thread has applied it."""
        if mode not in CUT_MODES:
            raise ValueError(f"mode must be one of {CUT_MODES}, got {mode!r}")
        self._command("cut", mode)

    def restore(self) -> None:
        """End the cut; returns once the proxy thread relays again."""
        self._command("restore", None)

    @contextlib.contextmanager
    def cut_for(self, seconds: float, mode: str = "reset") -> Iterator[None]:
        """``with proxy.cut_for(6):`` cuts, runs the block, waits out the rest of ``seconds``, restores."""
        t0 = time.monotonic()
        self.cut(mode)
        try:
            yield
            left = seconds - (time.monotonic() - t0)
            if left > 0:
                time.sleep(left)
        finally:
            self.restore()

    def close(self) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in list(self._peer):
            _close(sock)
        for sock in (self._listener, self._wake_r, self._wake_w):
            _close(sock)
        self._sel.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, what: str, mode: str | None) -> None:
        done = threading.Event()
        with self._lock:
            self._pending.append((what, mode, done))
        self._wake_w.send(b"x")
        if not done.wait(5):
            raise TimeoutError("the proxy thread did not apply the command in 5 s")

    # ------------------------------------------------------------------ the relay thread
    def _loop(self) -> None:
        while self._running:
            for key, _ in self._sel.select(timeout=0.5):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._apply_commands()
                else:
                    self._relay(key.fileobj)  # type: ignore[arg-type]

    def _apply_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._lock:
            pending, self._pending = self._pending, []
        for what, mode, done in pending:
            if what == "cut":
                self.cuts += 1
                self._mode = mode
                if mode == "reset":
                    self._drop_all()
            else:
                if self._mode == "blackhole":
                    self._drop_all()  # what stalled during the cut is gone, as after a real partition
                self._mode = None
            done.set()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(True)
        client.settimeout(5.0)
        if self._mode == "reset":
            _close(client, rst=True)
            return
        upstream: socket.socket | None = None
        if self._mode is None:
            try:
                upstream = socket.create_connection(self.upstream, timeout=2.0)
                upstream.settimeout(5.0)
            except OSError:
                _close(client, rst=True)
                return
            self._peer[upstream] = client
            self._sel.register(upstream, selectors.EVENT_READ, "conn")
        self._peer[client] = upstream  # None during a blackhole: never connected upstream
        self._sel.register(client, selectors.EVENT_READ, "conn")
        self.relayed_connections += 1

    def _relay(self, sock: socket.socket) -> None:
        if sock not in self._peer:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        peer = self._peer.get(sock)
        if self._mode is not None or peer is None:
            return  # blackholed: read and dropped
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peer.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peer.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            _close(s, rst=True)

    def _drop_all(self) -> None:
        for sock in list(self._peer):
            self._drop(sock)


def _close(sock: socket.socket, *, rst: bool = False) -> None:
    with contextlib.suppress(OSError):
        if rst:  # SO_LINGER 0: close with RST, as a broken line looks to the other end
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
