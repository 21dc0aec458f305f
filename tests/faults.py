"""Fault injection for the chaos tests: an actor killer and a faulty HTTP proxy in front of S3, loopback only."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psutil


def busy_stage_actor_processes() -> list[tuple[psutil.Process, str]]:
    """Live Ray Data stage actors of the Ray this process started that are running a batch right now.

    Ray titles an actor process `ray::<class>.<method>` while a method runs and `ray::<class>` when idle; a stage
    actor's batch call is `submit`. Killing only these makes every kill hit an in-flight batch, whatever the timing.
    Only this process's descendants (its Ray's raylet starts the workers): another test process's Ray on the
    same machine is left alone.
    """
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline()).strip()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended mid-scan (zombies included), or not ours
            continue
        if "MapWorker(MapBatches(" in title and title.endswith(".submit"):
            found.append((process, title))
    return found


class ActorKiller(threading.Thread):
    """SIGKILLs a stage actor in the middle of a batch, `kills` times, each in a different stage, `gap` s apart.

    Each kill leaves a batch that must be retried, and every later stage still has that row to process, so a run
    cannot finish before the next kill finds a busy actor of a stage not hit yet: the count does not depend on
    how fast the machine is.
    """

    def __init__(self, kills: int, gap: float = 1.0, seed: int = 0, poll: float = 0.02):
        super().__init__(daemon=True)
        self.kills, self.gap, self.poll = kills, gap, poll
        self.random = random.Random(seed)
        self.killed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.time() + 300
        while len(self.killed) < self.kills and not self.stop.wait(self.poll) and time.time() < deadline:
            victims = [(p, title) for p, title in busy_stage_actor_processes() if title not in self.killed]
            if not victims:
                continue
            victim, title = self.random.choice(victims)
            try:
                os.kill(victim.pid, signal.SIGKILL)
                self.killed.append(title)
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
            self.stop.wait(self.gap)


class FaultyProxy:
    """HTTP proxy to an upstream S3 endpoint that fails a share of requests, as a flaky network or store would.

    Faults: a 503 SlowDown reply, a connection dropped before forwarding, or dropped after forwarding (the
    request took effect, the reply was lost). Deterministic for a seed; counts what it injected.
    """

    def __init__(self, upstream: str, rate: float = 0.15, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.rate = rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = {"503": 0, "drop_before": 0, "drop_after": 0, "forwarded": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._draw()
                if fault == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "drop_before":
                    self._drop()
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "drop_after":
                    self._drop()
                    return
                self.send_response(status)
                for key, value in headers:
                    # A HEAD reply keeps the object's own Content-Length; others get the body's.
                    if key.lower() not in ("transfer-encoding", "connection") and \
                            (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> str | None:
        with self.lock:
            if self.random.random() >= self.rate:
                self.faults["forwarded"] += 1
                return None
            # Kinds in rotation, so even a short run sees each of them.
            injected = sum(self.faults.values()) - self.faults["forwarded"]
            fault = ("503", "drop_before", "drop_after")[injected % 3]
            self.faults[fault] += 1
            return fault

    def _forward(self, method, path, headers, body):
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            forwarded["Host"] = self.upstream.netloc
            connection.request(method, path, body=body, headers=forwarded)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
