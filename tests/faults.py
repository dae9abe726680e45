"""Fault injectors for the reliability tests: they act on real processes and on the S3 server itself,
never on the client code under test."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import psutil


def session_raylet_pid() -> int:
    """The raylet of the Ray instance this test process started (its workers are the raylet's children)."""
    import ray._private.worker as worker

    return worker._global_node.all_processes["raylet"][0].process.pid


def train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train worker processes (process title `ray::RayTrainWorker...`)."""
    raylet = session_raylet_pid()
    out = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["ppid"] == raylet and cmd.startswith("ray::RayTrainWorker"):
            out.append(p.info["pid"])
    return out


class WhenReady(threading.Thread):
    """Polls `ready()`; once it is true, calls `act()` (once) and records what it returned."""

    def __init__(self, ready: Callable[[], bool], act: Callable[[], object], timeout: float = 300):
        super().__init__(daemon=True)
        self.ready, self.act, self.timeout = ready, act, timeout
        self.result: object = None
        self.fired_at: float | None = None
        self.start()

    def run(self):
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            try:
                ok = self.ready()
            except Exception:
                ok = False
            if ok:
                self.fired_at = time.time()
                self.result = self.act()
                return
            time.sleep(0.05)


def kill_one_train_worker() -> int | None:
    pids = train_worker_pids()
    if not pids:
        return None
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


class S3Outage:
    """Stops the session's moto server (its listening socket closed: connections are refused) when the
    first PUT whose path contains `trigger` arrives (that request gets a 503), and starts it again on the
    same port `down_seconds` later. Moto keeps its buckets in the test process, so they survive."""

    def __init__(self, server, trigger: str, down_seconds: float):
        self.server, self.trigger, self.down_seconds = server, trigger, down_seconds
        self.armed = True
        self.stopped_at: float | None = None
        self.restarted_at: float | None = None
        self.request: str = ""
        wsgi = server._server
        wsgi.app = self._middleware(wsgi.app)

    def _middleware(self, app):
        def handle(environ, start_response):
            if self.armed and environ["REQUEST_METHOD"] == "PUT" and self.trigger in environ.get("PATH_INFO", ""):
                self.armed = False
                self.request = environ["PATH_INFO"]
                threading.Thread(target=self._outage, daemon=True).start()
                start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
                return [b"<Error><Code>ServiceUnavailable</Code><Message>server stopping</Message></Error>"]
            return app(environ, start_response)

        return handle

    def _outage(self):
        time.sleep(0.05)  # let the 503 go out
        self.server.stop()
        self.server._server.server_close()
        self.stopped_at = time.time()
        time.sleep(self.down_seconds)
        self.server.start()
        self.restarted_at = time.time()
