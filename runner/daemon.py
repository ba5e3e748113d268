"""The runner process: load plugins and the configuration, serve every device, answer the
control socket, reload on SIGHUP, drain and remove everything on SIGTERM/SIGINT.

Recovery: every device the runner serves is recorded in the state file (:mod:`runner.state`).
A runner that starts and finds its device QUIESCED there (the previous runner died: SIGKILL, a
crash, or SIGQUIT, which exits on purpose without removing devices, for upgrades) takes it over
with user recovery: same ``/dev/ublkbN``, and IO the kernel held meanwhile is served.

Threads: the main thread owns the configuration and handles signals; each device's queues have
their own threads (:mod:`runner.server`); the control socket has one thread, which forwards
requests that change devices to the main thread so that starts and stops never race.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue as _queue
import signal
import socket
import socketserver
import sys
import threading
import time

from . import config as _config
from . import state as _state
from . import ublk
from .errors import ConfigError
from .plugins import load_plugins
from .server import DeviceFailed, DeviceServer

log = logging.getLogger("ublk_runner")


def setup_logging(level: str, target: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if target == "journald":
        try:
            from systemd.journal import JournalHandler  # Debian: python3-systemd
            handler = JournalHandler(SYSLOG_IDENTIFIER="ublk-runner")
            fmt = "%(name)s: %(message)s"
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(fmt))
            root.addHandler(handler)
            root.setLevel(level.upper())
            log.warning("log_target journald needs python3-systemd; logging to stderr")
            return
    elif target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level.upper())


class Runner:
    def __init__(self, config_path: str, *, extra_plugins=(), socket_path: str | None = None,
                 state_dir: str | None = None, only: str | None = None, worker: bool = False):
        self.config_path = config_path
        g = _config.load_global(config_path)
        self.plugins = load_plugins(g.plugins.autoload, g.plugins.block, extra_plugins)
        for failure in self.plugins.errors:
            log.error("%s", failure)
        self.config = _config.load_config(config_path, self.plugins.registry)
        self.extra_plugins = tuple(extra_plugins)
        self.only, self.worker = only, worker
        if only is not None:
            # a worker process (runner.supervisor), or a manual run of one device
            if not any(d.name == only for d in self.config.devices):
                raise ConfigError(f"{config_path}: no device named {only!r} (--only)")
            self.config.devices = [d for d in self.config.devices if d.name == only]
        self.socket_path = socket_path or self.config.global_.control_socket
        self.state = _state.StateFile(state_dir or self.config.global_.state_dir)
        for problem in self.state.problems:
            log.warning("state: %s", problem)
        self._detach = threading.Event()
        self.servers: dict[str, DeviceServer] = {}
        self.failed: dict[str, str] = {}
        self.runtime_added: set[str] = set()
        self._requests: _queue.Queue = _queue.Queue()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._sock_server = None

    # ---------------------------------------------------------------- devices
    def start_device(self, cfg) -> DeviceServer | None:
        if cfg.isolate and self.only is None:
            return self._start_worker(cfg)
        digest = _config.recovery_digest(cfg)
        recover_id = None
        entry = self.state.get(cfg.name)
        if entry is not None:
            try:
                action, why = _state.classify(entry, digest)
            except Exception as e:  # noqa: BLE001 - the kernel would not tell: do not guess
                action, why = _state.BUSY, f"cannot ask the kernel about device {entry.dev_id}: {e}"
            if action == _state.RECOVER:
                log.info("device %s: %s; recovering it", cfg.name, why)
                recover_id = entry.dev_id
            elif action == _state.BUSY:
                log.error("device %s: not started: %s", cfg.name, why)
                self.failed[cfg.name] = why
                return None
            else:
                if action == _state.REPLACE:
                    log.warning("device %s: %s; deleting it and creating a new device", cfg.name, why)
                    ublk.remove_device(entry.dev_id)
                else:
                    log.warning("device %s: state entry dropped: %s", cfg.name, why)
                self.state.drop(cfg.name)
        srv = DeviceServer(cfg, self.plugins.registry[cfg.handler], self.plugins)
        srv.exit_on_stall = self.worker
        try:
            srv.start(timeout=max(30.0, cfg.request_timeout), recover_id=recover_id)
        except DeviceFailed as e:
            log.error("%s", e)
            self.failed[cfg.name] = str(e)
            if recover_id is not None:
                self.state.drop(cfg.name)
            return None
        self.state.put(_state.Entry(name=cfg.name, dev_id=srv.dev_id, digest=digest, pid=os.getpid(),
                                    handler=cfg.handler))
        self.failed.pop(cfg.name, None)
        self.servers[cfg.name] = srv
        self.plugins.notify("ublk_runner_device_started", device=srv)
        return srv

    def _start_worker(self, cfg):
        from .supervisor import WorkerDevice
        srv = WorkerDevice(cfg, self)
        try:
            srv.start(timeout=max(120.0, cfg.request_timeout))
        except DeviceFailed as e:
            log.error("%s", e)
            self.failed[cfg.name] = str(e)
            return None
        self.failed.pop(cfg.name, None)
        self.servers[cfg.name] = srv
        log.info("device %s: served by worker pid %d (%s)", cfg.name, srv.proc.pid, srv.info.get("block"))
        self.plugins.notify("ublk_runner_device_started", device=srv)
        return srv

    def worker_failed(self, name: str, reason: str) -> None:
        """A worker gave up on its device (called from its monitor thread)."""
        if self.servers.get(name) is not None:
            self.servers.pop(name, None)
            self.failed[name] = reason

    def stop_device(self, name: str) -> None:
        srv = self.servers.pop(name, None)
        self.failed.pop(name, None)
        if srv is None:
            return
        t0 = time.monotonic()
        srv.stop()
        log.info("device %s: stopped and deleted in %.2f s", name, time.monotonic() - t0)
        self.state.drop(name)
        self.plugins.notify("ublk_runner_device_stopped", device=srv)

    def forget_orphans(self) -> None:
        """Devices in the state file that the configuration no longer names: nobody will recover
        them, so delete those no live process serves."""
        names = {d.name for d in self.config.devices}
        for name, entry in list(self.state.entries.items()):
            if name in names:
                continue
            try:
                action, why = _state.classify(entry, "")
            except Exception as e:  # noqa: BLE001
                log.error("state: device %s (id %d) is no longer configured; left alone: %s", name, entry.dev_id, e)
                continue
            if action == _state.BUSY:
                log.warning("state: device %s is no longer configured but %s; left alone", name, why)
                continue
            if action in (_state.RECOVER, _state.REPLACE):
                log.warning("state: device %s (id %d) is no longer configured; deleting it", name, entry.dev_id)
                ublk.remove_device(entry.dev_id)
            self.state.drop(name)

    def reload(self) -> None:
        try:
            new = _config.load_config(self.config_path, self.plugins.registry)
            if self.only is not None:
                new.devices = [d for d in new.devices if d.name == self.only]
        except ConfigError as e:
            log.error("reload of %s refused, keeping the running configuration:\n%s", self.config_path, e)
            return
        old = _config.Config(self.config.global_, [d for d in self.config.devices], self.config.path)
        plan = _config.reload_plan(old, new)
        log.info("reload: add %s, remove %s, change %s, keep %s", list(plan.add), list(plan.remove),
                 list(plan.change), list(plan.keep))
        for name in plan.remove + plan.change:
            self.stop_device(name)
        self.config = new
        for name in plan.add + plan.change:
            self.start_device(new.device(name))
        # a device that failed before gets another chance on reload
        for name in plan.keep:
            if name in self.failed:
                self.start_device(new.device(name))

    # ---------------------------------------------------------------- control socket
    def _handle_request(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "list":
            return {"devices": [s.describe() for s in self.servers.values()],
                    "failed": self.failed}
        if cmd == "stats":
            names = [req["name"]] if req.get("name") else list(self.servers)
            missing = [n for n in names if n not in self.servers]
            if missing:
                raise KeyError(f"no device named {missing[0]!r}")
            return {n: self.servers[n].stats() for n in names}
        if cmd == "plugins":
            return [dataclasses.asdict(p) for p in self.plugins.list_plugins()]
        if cmd in ("add", "del"):
            # device changes run on the main thread, one at a time
            reply: _queue.Queue = _queue.Queue()
            self._requests.put((req, reply))
            ok, value = reply.get(timeout=300)
            if not ok:
                raise RuntimeError(value)
            return value
        raise ValueError(f"unknown command {cmd!r}")

    def _apply_change(self, req: dict):
        if req["cmd"] == "del":
            name = req.get("name")
            if name not in self.servers and name not in self.failed:
                raise KeyError(f"no device named {name!r}")
            self.stop_device(name)
            self.runtime_added.discard(name)
            self.config.devices = [d for d in self.config.devices if d.name != name]
            return {"deleted": name}
        dev = dict(req.get("device") or {})
        if dev.get("name") in self.servers:
            raise ValueError(f"a device named {dev.get('name')!r} already exists")
        cfg = _config.validate({"devices": [dev]}, "<control socket>", self.plugins.registry).devices[0]
        srv = self.start_device(cfg)
        if srv is None:
            raise RuntimeError(self.failed.pop(cfg.name))
        self.runtime_added.add(cfg.name)
        self.config.devices.append(cfg)
        return srv.describe()

    def _start_socket(self) -> None:
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                raise RuntimeError(f"another runner is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        runner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    try:
                        result = {"ok": True, "result": runner._handle_request(json.loads(line))}
                    except Exception as e:  # noqa: BLE001 - reported to the client
                        result = {"ok": False, "error": str(e).strip("'\"")}
                    self.wfile.write(json.dumps(result, default=str).encode() + b"\n")

        old_umask = os.umask(0o177)  # root-only socket
        try:
            self._sock_server = socketserver.ThreadingUnixStreamServer(path, Handler)
        finally:
            os.umask(old_umask)
        self._sock_server.daemon_threads = True
        threading.Thread(target=self._sock_server.serve_forever, daemon=True, name="control-socket").start()

    # ---------------------------------------------------------------- main loop
    @staticmethod
    def protect_from_oom() -> None:
        """A block-device server the OOM killer picks cannot write back the dirty pages that would
        free memory: the deadlock ublksrv avoids the same way.  Workers inherit the setting."""
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-1000")
        except OSError as e:
            log.warning("cannot exempt the runner from the OOM killer (/proc/self/oom_score_adj): %s", e)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *a: self._stop.set())
        signal.signal(signal.SIGINT, lambda *a: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *a: self._reload.set())
        signal.signal(signal.SIGQUIT, lambda *a: (self._detach.set(), self._stop.set()))
        self.protect_from_oom()
        self._start_socket()
        self.forget_orphans()
        m = self.config.global_.metrics
        if m.prometheus_port:
            from .metrics import start_exporter
            start_exporter(m.prometheus_port, m.prometheus_addr, lambda: list(self.servers.values()))
        for cfg in self.config.devices:
            if self._stop.is_set():
                break
            self.start_device(cfg)
        log.info("ready: %d device(s) serving, %d failed; control socket %s", len(self.servers),
                 len(self.failed), self.socket_path)
        print(json.dumps({"ready": [s.describe() for s in self.servers.values()], "failed": self.failed}),
              flush=True)
        if self.worker and self.failed:
            from .supervisor import EXIT_DEVICE_FAILED
            return EXIT_DEVICE_FAILED
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            try:
                req, reply = self._requests.get(timeout=0.2)
            except _queue.Empty:
                continue
            try:
                reply.put((True, self._apply_change(req)))
            except Exception as e:  # noqa: BLE001
                reply.put((False, str(e).strip("'\"")))
        if self._detach.is_set():
            return self._detach_exit()
        log.info("stopping %d device(s)", len(self.servers))
        for name in list(self.servers):
            self.stop_device(name)
        if self._sock_server:
            self._sock_server.shutdown()
            self._sock_server.server_close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        log.info("stopped")
        return 0


    def _detach_exit(self) -> int:
        """SIGQUIT: leave every recoverable device QUIESCED for the next runner (an upgrade
        without unmounting) and exit at once.  The kernel holds new IO; requests in flight are
        reissued (or failed, recovery: requeue) when the next runner takes over."""
        keep = [n for n, s in self.servers.items() if s.recovery_mode]
        for name in [n for n in self.servers if n not in keep]:
            self.stop_device(name)
        for srv in self.servers.values():
            if hasattr(srv, "detach"):
                srv.detach()
        log.warning("detaching (SIGQUIT): leaving %d device(s) for the next runner to recover: %s",
                    len(keep), ", ".join(f"{n}=/dev/ublkb{self.servers[n].dev_id}" for n in keep) or "-")
        if self._sock_server:
            self._sock_server.server_close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)  # no atexit: it would delete the devices


def control_request(socket_path: str, req: dict, timeout: float = 310.0):
    """Send one request to a running runner; returns its result or raises RuntimeError."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise RuntimeError(f"no runner is listening on {socket_path} ({e.strerror})") from None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return reply["result"]


def wait_ready(proc_stdout, timeout: float = 120.0) -> dict:
    """Helper for tests and scripts: read the runner's one-line JSON readiness report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc_stdout.readline()
        if not line:
            break
        if line.startswith("{") and '"ready"' in line:
            return json.loads(line)
    raise TimeoutError("the runner did not report ready")
