"""Start ``ublk-runner run`` as a real process for the device tests, and drive its CLI."""
from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(*cmd, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run a command; unless check=False, a non-zero exit fails the test with its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {p.returncode}: {p.stdout}{p.stderr}")
    return p


def read_direct(path, offset: int, length: int) -> bytes:
    """Read a device with O_DIRECT (no page cache), so the bytes come from the server."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return buf[:n]
    finally:
        os.close(fd)


class RunnerProcess:
    def __init__(self, tmp_path, yaml_text: str, python: str = sys.executable, extra_args=()):
        self.dir = tmp_path
        self.config = tmp_path / "runner.yaml"
        self.socket = str(tmp_path / "control.sock")
        self.python = python
        self.state_dir = str(tmp_path / "state")  # per test: a killed runner's table stays there
        self.killed = False
        if yaml_text is not None:
            self.write_config(yaml_text)
        n = 0
        while (tmp_path / f"runner{n or ''}.log").exists():
            n += 1
        self.stderr_path = tmp_path / f"runner{n or ''}.log"
        self._stderr = open(self.stderr_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [python, "-m", "runner.cli", "run", "-c", str(self.config), "--socket", self.socket,
             "--state-dir", self.state_dir, "--log-level", "debug", *extra_args],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO)
        self.ready = self._wait_ready(180)
        self.ready_after = time.monotonic() - self.started

    def write_config(self, yaml_text: str) -> None:
        self.config.write_text(textwrap.dedent(yaml_text))

    def _wait_ready(self, timeout: float) -> dict:
        result = {}

        def reader():
            for line in self.proc.stdout:
                if line.startswith("{") and '"ready"' in line:
                    result["ready"] = json.loads(line)
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if "ready" not in result:
            self.stop()
            raise AssertionError(f"runner not ready; log:\n{self.log()}")
        return result["ready"]

    def log(self) -> str:
        if not self._stderr.closed:   # stop() and kill() close it; the log is still worth showing
            self._stderr.flush()
        return self.stderr_path.read_text()

    def cli(self, *args, check=True, timeout=300) -> subprocess.CompletedProcess:
        p = subprocess.run([self.python, "-m", "runner.cli", *args, *(
            ["--socket", self.socket] if args and args[0] in ("list", "stats", "add", "del") else [])],
            capture_output=True, text=True, cwd=REPO, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ublk-runner {' '.join(args)} failed: {p.stderr}\nrunner log:\n{self.log()}")
        return p

    def cli_json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def devices(self) -> dict:
        return {d["name"]: d for d in self.cli_json("list")["devices"]}

    def kill(self, sig=signal.SIGKILL) -> float:
        """Kill the runner (no cleanup runs); returns the monotonic time of the kill."""
        t = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.killed = sig == signal.SIGKILL
        self._stderr.close()
        return t

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                subprocess.run([sys.executable, "-m", "runner.cli", "cleanup"], cwd=REPO, timeout=60)
                raise AssertionError(f"runner did not stop on SIGTERM; log:\n{self.log()}")
        self._stderr.close()
        return self.proc.returncode
