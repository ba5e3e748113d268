"""Isolation: a device with ``isolate: true`` is served by its own worker process, so a handler
that crashes the interpreter, leaks or deadlocks takes down only that device, which the
supervisor (the runner process) then restarts.  The restarted worker takes the QUIESCED device
over with user recovery: the same ``/dev/ublkbN``, IO held by the kernel meanwhile is served.

A worker is the runner itself, ``ublk-runner run --only NAME --worker``, with its own control
socket and state directory under the supervisor's ``state_dir``; it dies with the supervisor
(PR_SET_PDEATHSIG), and kills itself when a queue thread is stuck inside the handler past the
device's ``request_timeout``, so a deadlock becomes a restart.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("ublk_runner.supervisor")

EXIT_DEVICE_FAILED = 3        # the worker could not start (or recover) its device: do not restart
BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER = 60.0           # a worker that served this long resets the backoff


class WorkerDevice:
    """The supervisor's handle on one isolated device; looks like a DeviceServer to the runner."""

    def __init__(self, cfg, runner):
        self.cfg = cfg
        self.name = cfg.name
        self.runner = runner
        base = os.path.join(runner.state.dir, "workers", cfg.name)
        self.state_dir = base
        self.socket_path = base + ".sock"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.restarts = 0
        self.failed_reason: str | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.recovery_mode = "worker"  # SIGQUIT detach leaves isolated devices to their workers' restart

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float) -> None:
        from .server import DeviceFailed
        err = self._spawn(timeout)
        if err:
            raise DeviceFailed(f"device {self.name!r}: worker: {err}")
        self._monitor = threading.Thread(target=self._watch, daemon=True, name=f"worker-{self.name}")
        self._monitor.start()

    def _argv(self) -> list[str]:
        r = self.runner
        argv = [sys.executable, "-m", "runner.cli", "run", "-c", os.path.abspath(r.config_path),
                "--only", self.name, "--worker", "--socket", self.socket_path, "--state-dir", self.state_dir]
        for p in r.extra_plugins:
            argv += ["--plugin", p]
        level = logging.getLevelName(logging.getLogger().level).lower()
        if level in ("debug", "info", "warning", "error"):
            argv += ["--log-level", level]
        return argv

    def _spawn(self, timeout: float) -> str | None:
        """Start a worker and wait for its readiness line; returns an error text or None."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        env = dict(os.environ, UBLK_RUNNER_SUPERVISOR=str(os.getpid()))
        # the worker's stderr is the supervisor's: one log stream, each line names the device
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=env, cwd=os.getcwd())
        ready: dict = {}

        def read():
            for line in self.proc.stdout:
                if line.startswith("{") and '"ready"' in line:
                    ready.update(json.loads(line))
                    break

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not ready:
            self._kill()
            return f"did not report ready within {timeout:.0f} s (exit code {self.proc.returncode})"
        if ready.get("failed"):
            self.proc.wait(30)
            return "; ".join(ready["failed"].values())
        self.info = ready["ready"][0]
        self.started_at = time.monotonic()
        return None

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def _watch(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            rc = self.proc.wait()
            if self._stopping.is_set():
                return
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            if rc == EXIT_DEVICE_FAILED:
                self.failed_reason = f"worker exited: its device failed ({how})"
                log.error("device %s: %s; not restarting it", self.name, self.failed_reason)
                self.runner.worker_failed(self.name, self.failed_reason)
                return
            if time.monotonic() - self.started_at > STABLE_AFTER:
                attempt = 0
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            log.error("device %s: worker pid %d died (%s); restarting it%s to recover %s", self.name,
                      self.proc.pid, how, f" in {delay:g} s" if delay else "", self.info.get("block"))
            if self._stopping.wait(delay):
                return
            attempt += 1
            self.restarts += 1
            t0 = time.monotonic()
            err = self._spawn(max(120.0, self.cfg.request_timeout))
            if err:
                self.failed_reason = err
                log.error("device %s: restarted worker failed: %s", self.name, err)
                self.runner.worker_failed(self.name, err)
                return
            log.info("device %s: worker pid %d recovered %s in %.1f s (restart %d)", self.name,
                     self.proc.pid, self.info.get("block"), time.monotonic() - t0, self.restarts)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("device %s: worker pid %d did not stop in %.0f s; killing it", self.name,
                          self.proc.pid, timeout)
                self._kill()
                self._discard()
        if self._monitor and self._monitor is not threading.current_thread():
            self._monitor.join(10)

    def _discard(self) -> None:
        """A killed worker leaves its device QUIESCED: delete it (its state file says which)."""
        from .state import StateFile
        from .ublk import remove_device
        for entry in StateFile(self.state_dir).entries.values():
            try:
                remove_device(entry.dev_id)
            except Exception as e:  # noqa: BLE001
                log.error("device %s: deleting device %d failed: %s", self.name, entry.dev_id, e)

    def detach(self) -> None:
        """SIGQUIT to the worker: it leaves its device QUIESCED and exits."""
        self._stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill()

    # ------------------------------------------------------------------ reporting
    def _ask(self, req: dict):
        from .daemon import control_request
        return control_request(self.socket_path, req, timeout=10)

    @property
    def dev_id(self):
        return self.info.get("id")

    @property
    def config(self):
        return self.cfg

    def describe(self) -> dict:
        try:
            d = self._ask({"cmd": "list"})["devices"][0]
        except Exception as e:  # noqa: BLE001 - a dead or restarting worker
            d = dict(self.info, state=f"worker unreachable ({e})")
        d = dict(d)
        d["mode"] = f"worker:{d.get('mode')}"
        d["worker_pid"] = self.proc.pid if self.proc else None
        d["restarts"] = self.restarts
        return d

    def stats(self) -> dict:
        return self._ask({"cmd": "stats", "name": self.name})[self.name]


def become_worker() -> None:
    """In a worker: die with the supervisor, so a new supervisor's worker can recover the device."""
    sup = os.environ.get("UBLK_RUNNER_SUPERVISOR")
    if not sup:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(sup):  # the supervisor died before prctl took effect
        os._exit(1)
