"""Processes of the distributed stack for the fault tests and the fault soak: start, wait ready, kill -9.

* :class:`ServiceProcess`: one child process (its output to a log file) that can be killed with SIGKILL
  and started again with the same command and environment;
* :func:`celery_worker` / :func:`organizer`: the two services, as ``compose.yaml`` runs them, with the
  environment the caller gives (``ASYNCTHINK_REDIS_URL``, ``DATABASE_URL``, ``ASYNCTHINK_BACKEND_FACTORY``...);
* :func:`wait_worker_ready`: a Celery worker answers an ``asyncthink.echo`` task; :func:`wait_organizer_ready`:
  an organizer's log says it consumes the problems stream.

Limits: loopback, one host; a killed process's children (none: the worker runs ``--pool=threads``) are
not hunted down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """A child process that can be killed (SIGKILL) and started again (see the module doc)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> ServiceProcess:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"\n===== start {self.starts} of {self.name} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is acked or handed back."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.kills += 1
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def service_env(**extra: str) -> dict[str, str]:
    """The current environment plus ``extra``, with the repository on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def celery_worker(
    env: dict[str, str], log_path: Path, *, queues: str = "model,tool", concurrency: int = 4, name: str = "worker",
    prefetch: int = 1,
) -> ServiceProcess:
    """A Celery worker process: ``concurrency`` threads, ``concurrency x prefetch`` worker runs in flight."""
    celery = str(Path(sys.executable).with_name("celery"))
    argv = [
        celery, "-A", "services.workers.app", "worker", "-Q", queues, "--pool=threads", "-c", str(concurrency),
        "--prefetch-multiplier", str(prefetch),
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{name}@%h",
    ]
    return ServiceProcess(name, argv, env, log_path)


def organizer(env: dict[str, str], log_path: Path, *args: str, name: str = "organizer") -> ServiceProcess:
    argv = [sys.executable, "-m", "services.organizer", "--consumer", name, *args]
    return ServiceProcess(name, argv, env, log_path)


def wait_worker_ready(app: Any, worker: ServiceProcess, timeout_s: float = 60.0) -> float:
    """Seconds until ``worker`` answers an echo task (RuntimeError with its log if it dies or never does)."""
    t0 = time.monotonic()
    while True:
        if not worker.alive:
            raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
        try:
            app.send_task("asyncthink.echo", args=["ping"], queue="model").get(timeout=2)
            return time.monotonic() - t0
        except Exception:
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{worker.name} did not answer in {timeout_s:g} s:\n{worker.log_tail()}") from None


def wait_organizer_ready(proc: ServiceProcess, timeout_s: float = 60.0) -> float:
    """Seconds until an organizer's log says it consumes the problems stream (this start of it)."""
    t0 = time.monotonic()
    marker = f"===== start {proc.starts} of {proc.name}"
    while True:
        log = proc.log_tail(2_000_000)
        if "consuming asyncthink:problems" in log.split(marker)[-1]:
            return time.monotonic() - t0
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{proc.name} did not start consuming in {timeout_s:g} s:\n{proc.log_tail()}")
        time.sleep(0.1)
