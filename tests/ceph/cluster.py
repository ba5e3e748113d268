#!/usr/bin/python3
"""A throw-away, real Ceph cluster for tests: one monitor, one OSD, cephx, loopback only.

Everything (config, keyrings, monitor store, OSD data, logs, sockets, pid files) lives
under one directory; nothing is read from /etc/ceph and nothing listens outside 127.0.0.1.
No manager daemon is started (RBD IO does not need one).

Module use::

    c = Cluster("/tmp/x")          # objectstore="memstore" (default) or "bluestore"
    info = c.up()                  # dict: conf, keyring, client, client_id, pool, ...
    c.stop_osd(); c.start_osd()    # fault injection (see README for semantics)
    c.down()

CLI::

    python3 tests/ceph/cluster.py up DIR [--objectstore bluestore] [--image NAME --size BYTES]
    python3 tests/ceph/cluster.py down DIR

``up`` leaves the daemons running in the background (their pids are recorded in
DIR/cluster.json) and prints a JSON object; ``down`` kills them and removes nothing but
the daemons' run state (pass --purge to delete DIR as well).

Every wait is bounded; failures raise ClusterError with the tail of the relevant log,
and a failing ``up`` kills whatever it had started.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool")
STATE_FILE = "cluster.json"
POOL = "rbd"
CLIENT_ID = "ublk"  # a non-admin user with the standard RBD caps


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    """Names of the Ceph programs (and Python bindings) that are not installed."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    for mod in ("rados", "rbd"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"python3-{mod}")
    return missing


ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mgr": "allow *"}


def gen_key() -> str:
    """A new cephx secret, as `ceph-authtool --gen-print-key` makes it (CryptoKey encoding:
    le16 type=1 (AES), le32 secs, le32 nsecs, le16 length=16, 16 random bytes; base64)."""
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + os.urandom(16)
    return base64.b64encode(raw).decode()


def _write_keyring(path: str, entity: str, key: str, caps: dict, append: bool = False) -> None:
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {k} = "{v}"' for k, v in caps.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def _clean_env() -> dict:
    env = dict(os.environ)
    for k in ("CEPH_CONF", "CEPH_KEYRING", "CEPH_ARGS", "CEPH_CLIENT_ID"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = f.read().decode(errors="replace").splitlines()[-n:]
        return "\n".join(lines)
    except OSError:
        return "(no log)"


def _crush_host() -> str:
    """The hostname as a valid CRUSH bucket name ("localhost" if there is none)."""
    name = socket.gethostname().split(".")[0]
    name = "".join(c for c in name if c.isalnum() or c in "-_")
    return name if name and name != "none" else "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        wpid, _ = os.waitpid(pid, os.WNOHANG)
        return wpid == 0
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.01)
    if sig != signal.SIGKILL:
        _kill_wait(pid, signal.SIGKILL, 5.0)
        return
    raise ClusterError(f"process {pid} did not exit {timeout}s after signal {sig}")


class Cluster:
    def __init__(self, dir: str, objectstore: str = "memstore",
                 store_bytes: int = 4 << 30, pool: str = POOL):
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError("objectstore must be 'memstore' or 'bluestore'")
        self.dir = os.path.abspath(dir)
        self.objectstore = objectstore
        self.store_bytes = store_bytes
        self.pool = pool
        self.port: int | None = None
        self.fsid: str | None = None
        self.osd_uuid: str | None = None
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.env = _clean_env()

    # ---- paths -------------------------------------------------------------
    @property
    def conf(self) -> str:
        return os.path.join(self.dir, "ceph.conf")

    @property
    def admin_keyring(self) -> str:
        return os.path.join(self.dir, "client.admin.keyring")

    @property
    def client_keyring(self) -> str:
        return os.path.join(self.dir, f"client.{CLIENT_ID}.keyring")

    def log(self, name: str) -> str:
        return os.path.join(self.dir, "log", f"{name}.log")

    @property
    def mon_addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- helpers -----------------------------------------------------------
    def _run(self, args: list[str], timeout: float = 30.0, what: str | None = None,
             log: str | None = None) -> str:
        try:
            p = subprocess.run(args, env=self.env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{what or args[0]} timed out after {timeout}s: {' '.join(args)}"
                               + (f"\nlog tail:\n{_tail(log)}" if log else ""))
        if p.returncode != 0:
            raise ClusterError(f"{what or args[0]} failed (rc={p.returncode}): {' '.join(args)}\n"
                               f"{p.stderr.strip()[-2000:]}"
                               + (f"\nlog tail:\n{_tail(log)}" if log else ""))
        return p.stdout

    def _write_conf(self) -> None:
        d = self.dir
        osd_store = [f"osd objectstore = {self.objectstore}"]
        if self.objectstore == "memstore":
            osd_store += [
                "memstore device bytes = %d" % self.store_bytes,
                "memstore page set = true",
                "memstore page size = 4096",
                # SIGTERM must unmount the store: that is when memstore saves its RAM to
                # osd data and so survives a restart. The default fast shutdown just exits.
                "osd fast shutdown = false",
            ]
        else:
            osd_store += [
                "bluestore block create = true",
                "bluestore block size = %d" % self.store_bytes,
                "bluestore block db create = false",
                "bluestore block wal create = false",
                "bluestore fsck on mount = false",
                "bluestore cache size = 134217728",
                "osd memory target = 939524096",
            ]
        text = f"""# generated by tests/ceph/cluster.py
[global]
fsid = {self.fsid}
mon host = [v2:{self.mon_addr}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
admin socket = {d}/run/$name.$pid.$cctid.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
crash dir = {d}/crash
mon cluster log file = {d}/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 1
paxos propose interval = 0.05
paxos min wait = 0.01
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = {d}/mon.$id
keyring = {d}/mon.keyring

[osd]
osd data = {d}/osd.$id
keyring = $osd_data/keyring
# explicit: the OSD otherwise derives host= from the hostname, and a host without one (the
# test VM's "(none)") makes its crush create-or-move fail with EINVAL and the OSD exit
crush location = root=default host={_crush_host()}
{chr(10).join(osd_store)}

[client]
err to stderr = false
rados mon op timeout = 30
client mount timeout = 30

[client.admin]
keyring = {self.admin_keyring}

[client.{CLIENT_ID}]
keyring = {self.client_keyring}
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def _spawn(self, name: str, args: list[str]) -> int:
        errlog = open(self.log(name + ".stderr"), "ab")
        p = subprocess.Popen(args + ["-f", "-c", self.conf], env=self.env, stdin=subprocess.DEVNULL,
                             stdout=errlog, stderr=errlog, start_new_session=True)
        errlog.close()
        self._procs[name] = p
        self.pids[name] = p.pid
        self._save_state()
        return p.pid

    def _save_state(self) -> None:
        state = {
            "dir": self.dir, "port": self.port, "fsid": self.fsid, "osd_uuid": self.osd_uuid,
            "objectstore": self.objectstore, "store_bytes": self.store_bytes, "pool": self.pool,
            "pids": self.pids,
        }
        tmp = os.path.join(self.dir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, STATE_FILE))

    @classmethod
    def load(cls, dir: str) -> "Cluster":
        with open(os.path.join(dir, STATE_FILE)) as f:
            s = json.load(f)
        c = cls(s["dir"], s["objectstore"], s["store_bytes"], s["pool"])
        c.port, c.fsid, c.osd_uuid, c.pids = s["port"], s["fsid"], s["osd_uuid"], s["pids"]
        return c

    def rados(self, timeout: float = 20.0, name: str = "client.admin"):
        """A connected admin librados handle (caller shuts it down)."""
        import rados
        keyring = self.admin_keyring if name == "client.admin" else self.client_keyring
        timeout = max(1, timeout)  # 0 would mean "wait forever" to librados
        r = rados.Rados(conffile=self.conf, name=name,
                        conf={"keyring": keyring,
                              "client_mount_timeout": str(int(timeout)),
                              "rados_mon_op_timeout": str(int(timeout)),
                              "rados_osd_op_timeout": str(int(timeout))})
        try:
            r.connect(timeout=int(timeout))
        except Exception as e:
            r.shutdown()
            raise ClusterError(f"cannot connect to monitor {self.mon_addr}: {e}\n"
                               f"mon log tail:\n{_tail(self.log('mon.a'))}") from e
        return r

    def mon_command(self, r, cmd: dict, timeout: float = 20.0) -> dict | str:
        ret, out, err = r.mon_command(json.dumps(cmd), b"", timeout=int(timeout))
        if ret != 0:
            raise ClusterError(f"mon command {cmd} failed: {ret} {err}")
        if cmd.get("format") == "json":
            return json.loads(out or b"null")
        return out.decode(errors="replace")

    # ---- life cycle --------------------------------------------------------
    def up(self, timeout: float = 60.0, image: str | None = None, image_size: int = 1 << 30) -> dict:
        t0 = time.monotonic()
        deadline = t0 + timeout  # for all attempts together
        try:
            for attempt in range(3):
                try:
                    self._up_once(deadline)
                    break
                except ClusterError as e:
                    # A port taken between probing and binding, or the rare ceph-osd --mkfs
                    # failure, is worth a fresh attempt in a clean directory.
                    self.kill_all()
                    if attempt == 2 or time.monotonic() > deadline - 5:
                        raise
                    if os.path.isdir(os.path.join(self.dir, "log")):
                        shutil.copytree(os.path.join(self.dir, "log"),
                                        os.path.join(self.dir, f"failed-attempt-{attempt}-log"),
                                        dirs_exist_ok=True)
                    sys.stderr.write(f"cluster bring-up attempt {attempt + 1} failed, retrying: "
                                     f"{str(e).splitlines()[0]}\n")
            if image:
                self.create_image(image, image_size)
        except BaseException:
            self.kill_all()
            raise
        self.timings["up"] = time.monotonic() - t0
        return self.info()

    def _up_once(self, deadline: float) -> None:
        for sub in ("mon.a", "osd.0", "run", "log", "crash"):
            shutil.rmtree(os.path.join(self.dir, sub), ignore_errors=True)
        for sub in ("run", "log", "crash", "osd.0"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self.osd_uuid = str(uuid.uuid4())
        self.pids = {}
        self._write_conf()
        d = self.dir
        mon_kr = os.path.join(d, "mon.keyring")
        for p in (mon_kr, self.admin_keyring, self.client_keyring):
            if os.path.exists(p):
                os.unlink(p)
        admin_key, client_key, mon_key = gen_key(), gen_key(), gen_key()
        _write_keyring(self.admin_keyring, "client.admin", admin_key, ADMIN_CAPS)
        _write_keyring(self.client_keyring, f"client.{CLIENT_ID}", client_key,
                       {"mon": "profile rbd", "osd": f"profile rbd pool={self.pool}"})
        # The monitor keyring seeds the auth database: it holds every initial entity.
        _write_keyring(mon_kr, "mon.", mon_key, {"mon": "allow *"})
        _write_keyring(mon_kr, "client.admin", admin_key, ADMIN_CAPS, append=True)
        _write_keyring(mon_kr, f"client.{CLIENT_ID}", client_key,
                       {"mon": "profile rbd", "osd": f"profile rbd pool={self.pool}"}, append=True)
        monmap = os.path.join(d, "monmap")
        self._run(["monmaptool", "--create", "--clobber", "--addv", "a", f"[v2:{self.mon_addr}]",
                   "--fsid", self.fsid, monmap])
        self._run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                   "--keyring", mon_kr], what="ceph-mon --mkfs", log=self.log("mon.a"))
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        t = time.monotonic()
        r = self._connect_until(deadline)
        self.timings["mon"] = time.monotonic() - t
        try:
            t = time.monotonic()
            key = gen_key()
            secrets = json.dumps({"cephx_secret": key}).encode()
            ret, out, err = r.mon_command(json.dumps({"prefix": "osd new", "uuid": self.osd_uuid,
                                                      "id": 0}), secrets, timeout=20)
            if ret != 0:
                raise ClusterError(f"'osd new' failed: {ret} {err}")
            with open(os.path.join(d, "osd.0", "keyring"), "w") as f:
                f.write(f"[osd.0]\n\tkey = {key}\n")
            self._mkfs_osd()
            self.timings["osd_mkfs"] = time.monotonic() - t
            t = time.monotonic()
            self._spawn("osd.0", ["ceph-osd", "-i", "0"])
            self.wait_osd(up=True, deadline=deadline, r=r)
            self.timings["osd_up"] = time.monotonic() - t
            t = time.monotonic()
            self.mon_command(r, {"prefix": "osd pool create", "pool": self.pool, "pg_num": 8,
                                 "pgp_num": 8, "autoscale_mode": "off"})
            self.mon_command(r, {"prefix": "osd pool application enable", "pool": self.pool,
                                 "app": "rbd"})
            import rbd
            ioctx = r.open_ioctx(self.pool)
            try:
                # What `rbd pool init` does; it waits for the pool's PGs to be active.
                rbd.RBD().pool_init(ioctx, False)
            finally:
                ioctx.close()
            self.timings["pool"] = time.monotonic() - t
        finally:
            r.shutdown()

    def _mkfs_osd(self) -> None:
        args = ["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid]
        try:
            self._run(args, timeout=60, what="ceph-osd --mkfs", log=self.log("osd.0"))
        except ClusterError as first:
            # Known rare failure; retry once (the log of the first attempt is kept).
            shutil.copy(self.log("osd.0"), self.log("osd.0.mkfs-failed"))
            keyring = open(os.path.join(self.dir, "osd.0", "keyring")).read()
            shutil.rmtree(os.path.join(self.dir, "osd.0"))
            os.makedirs(os.path.join(self.dir, "osd.0"))
            with open(os.path.join(self.dir, "osd.0", "keyring"), "w") as f:
                f.write(keyring)
            sys.stderr.write(f"ceph-osd --mkfs failed once, retrying: {first}\n")
            self._run(args, timeout=60, what="ceph-osd --mkfs (retry)", log=self.log("osd.0"))

    def _connect_until(self, deadline: float):
        # First wait until the monitor accepts TCP connections (cheap 10 ms polls); a
        # librados connect started earlier would back off by its hunt interval.
        while time.monotonic() < deadline:
            pid = self.pids.get("mon.a")
            if pid and not _pid_alive(pid):
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.01)
        last = None
        while time.monotonic() < deadline:
            pid = self.pids.get("mon.a")
            if pid and not _pid_alive(pid):
                raise ClusterError("ceph-mon exited during start-up\n" + _tail(self.log("mon.a")) +
                                   "\n" + _tail(self.log("mon.a.stderr")))
            try:
                return self.rados(timeout=max(1, min(5, deadline - time.monotonic())))
            except ClusterError as e:
                last = e
                time.sleep(0.05)
        raise ClusterError(f"monitor not reachable before deadline: {last}")

    def osd_state(self, r=None) -> dict:
        own = r is None
        r = r or self.rados()
        try:
            dump = self.mon_command(r, {"prefix": "osd dump", "format": "json"})
        finally:
            if own:
                r.shutdown()
        for o in dump["osds"]:
            if o["osd"] == 0:
                return o
        return {}

    def wait_osd(self, up: bool, deadline: float | None = None, r=None, timeout: float = 60) -> None:
        deadline = deadline or time.monotonic() + timeout
        own = r is None
        r = r or self.rados()
        try:
            while time.monotonic() < deadline:
                pid = self.pids.get("osd.0")
                if up and pid and not _pid_alive(pid):
                    raise ClusterError("ceph-osd exited during start-up\n" + _tail(self.log("osd.0")) +
                                       "\n" + _tail(self.log("osd.0.stderr")))
                st = self.osd_state(r)
                if bool(st.get("up")) == up and (not up or st.get("in")):
                    return
                time.sleep(0.05)
        finally:
            if own:
                r.shutdown()
        raise ClusterError(f"osd.0 not {'up' if up else 'down'} before deadline\n"
                           + _tail(self.log("osd.0")))

    def create_image(self, name: str, size: int, features: int | None = None) -> None:
        import rbd
        r = self.rados()
        try:
            ioctx = r.open_ioctx(self.pool)
            try:
                kw = {} if features is None else {"features": features}
                rbd.RBD().create(ioctx, name, size, old_format=False, **kw)
            finally:
                ioctx.close()
        finally:
            r.shutdown()

    def info(self) -> dict:
        return {
            "dir": self.dir,
            "conf": self.conf,
            "keyring": self.client_keyring,
            "client": f"client.{CLIENT_ID}",
            "client_id": CLIENT_ID,
            "admin_keyring": self.admin_keyring,
            "admin_client": "client.admin",
            "pool": self.pool,
            "mon_host": self.mon_addr,
            "fsid": self.fsid,
            "objectstore": self.objectstore,
            "pids": dict(self.pids),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # ---- fault injection ---------------------------------------------------
    def stop_osd(self, mode: str = "auto", wait_down: bool = True,
                 allow_data_loss: bool = False) -> None:
        """Make the OSD go away.

        mode "kill": SIGKILL (a crash). Only data-preserving with bluestore.
        mode "term": SIGTERM; the OSD tells the monitor it is going down and a memstore
                     OSD first saves its RAM contents to its data directory (slow for
                     large data sets).
        mode "auto": "kill" for bluestore, "term" for memstore.

        A SIGKILLed memstore OSD comes back empty: its PGs no longer exist and client IO
        to them waits forever. That needs allow_data_loss=True.
        """
        if mode == "auto":
            mode = "kill" if self.objectstore == "bluestore" else "term"
        if mode not in ("kill", "term"):
            raise ValueError(f"bad stop mode {mode!r}")
        if mode == "kill" and self.objectstore == "memstore" and not allow_data_loss:
            raise ClusterError("SIGKILL loses all data of a memstore OSD; use mode='term', "
                               "objectstore='bluestore', or allow_data_loss=True")
        pid = self.pids.get("osd.0")
        if not pid:
            raise ClusterError("osd.0 is not running")
        sig = signal.SIGKILL if mode == "kill" else signal.SIGTERM
        _kill_wait(pid, sig, timeout=60)
        self._reap("osd.0")
        del self.pids["osd.0"]
        self._save_state()
        if wait_down:
            r = self.rados()
            try:
                if mode == "kill":
                    # Nobody tells the monitor about a crash of the only OSD (no peers to
                    # report it; the beacon timeout is 15 min). Do what an operator would.
                    self.mon_command(r, {"prefix": "osd down", "ids": ["0"]})
                self.wait_osd(up=False, r=r, timeout=30)
            finally:
                r.shutdown()

    def start_osd(self, wait_up: bool = True, timeout: float = 60) -> None:
        if self.pids.get("osd.0") and _pid_alive(self.pids["osd.0"]):
            raise ClusterError("osd.0 already running")
        self._spawn("osd.0", ["ceph-osd", "-i", "0"])
        if wait_up:
            self.wait_osd(up=True, timeout=timeout)

    def pause_osd(self) -> None:
        os.kill(self.pids["osd.0"], signal.SIGSTOP)

    def resume_osd(self) -> None:
        os.kill(self.pids["osd.0"], signal.SIGCONT)

    # ---- teardown ----------------------------------------------------------
    def _reap(self, name: str) -> None:
        p = self._procs.pop(name, None)
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def kill_all(self) -> None:
        errors = []
        for name, pid in list(self.pids.items()):
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
            try:
                _kill_wait(pid, signal.SIGKILL, timeout=10)
            except ClusterError as e:
                errors.append(f"{name}: {e}")
            self._reap(name)
            self.pids.pop(name, None)
        if os.path.isdir(self.dir):
            self._save_state()
        if errors:
            raise ClusterError("; ".join(errors))

    def down(self, purge: bool = False) -> None:
        t0 = time.monotonic()
        self.kill_all()
        if purge:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.timings["down"] = time.monotonic() - t0


def _pid_is_ceph(pid: int, dir: str) -> bool:
    """Only kill pids that still are our daemons (pid reuse safety for the CLI)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and os.path.basename(cmd[0].decode()).startswith("ceph-") and \
        os.path.join(dir, "ceph.conf").encode() in cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("dir")
    u.add_argument("--objectstore", default="memstore", choices=["memstore", "bluestore"])
    u.add_argument("--store-bytes", type=int, default=4 << 30)
    u.add_argument("--image", help="also create this RBD image")
    u.add_argument("--size", type=int, default=1 << 30, help="image size in bytes")
    u.add_argument("--timeout", type=float, default=60)
    dn = sub.add_parser("down")
    dn.add_argument("dir")
    dn.add_argument("--purge", action="store_true", help="also delete DIR")
    for name in ("stop-osd", "start-osd"):
        s = sub.add_parser(name)
        s.add_argument("dir")
        if name == "stop-osd":
            s.add_argument("--mode", default="auto", choices=["auto", "kill", "term"])
    a = ap.parse_args(argv)
    if a.cmd == "up":
        miss = missing_binaries()
        if miss:
            print(f"missing: {', '.join(miss)}", file=sys.stderr)
            return 2
        os.makedirs(a.dir, exist_ok=True)
        if os.path.exists(os.path.join(a.dir, STATE_FILE)):
            old = Cluster.load(a.dir)
            live = {n: p for n, p in old.pids.items() if _pid_is_ceph(p, old.dir)}
            if live:
                print(f"a cluster is already running in {a.dir} ({live}); "
                      f"run 'down {a.dir}' first", file=sys.stderr)
                return 1
        c = Cluster(a.dir, a.objectstore, a.store_bytes)
        try:
            info = c.up(timeout=a.timeout, image=a.image, image_size=a.size)
        except ClusterError as e:
            print(f"cluster up failed: {e}", file=sys.stderr)
            return 1
        if a.image:
            info["image"] = a.image
        # The daemons were started in their own sessions; leave them running.
        c._procs.clear()
        print(json.dumps(info, indent=1))
        return 0
    c = Cluster.load(a.dir)
    # Guard against pid reuse: only signal processes that are our daemons.
    c.pids = {n: p for n, p in c.pids.items() if _pid_is_ceph(p, c.dir)}
    if a.cmd == "down":
        c.down(purge=a.purge)
    elif a.cmd == "stop-osd":
        c.stop_osd(a.mode, allow_data_loss=a.mode == "kill")
    elif a.cmd == "start-osd":
        c.start_osd()
        c._procs.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
