"""What the runner must remember across its own death: which kernel device id serves which config
entry, so a restarted runner (or a restarted worker) can take its QUIESCED devices over instead of
creating new ones.

One small JSON file, ``<state_dir>/devices.json``, replaced atomically (write a temporary file,
fsync, rename, fsync the directory), so a crash at any moment leaves either the old or the new
version, never a torn one.  Entries are only a claim: before one is trusted the kernel is asked
about the device (:func:`classify`), and a stale or foreign entry is reported and dropped.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import tempfile
import threading

from . import ublk

log = logging.getLogger("ublk_runner.state")

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str            #: the config entry (device name)
    dev_id: int          #: the kernel's device id
    digest: str          #: :func:`runner.config.recovery_digest` of the entry that created it
    pid: int             #: the process that served it last
    handler: str


class StateFile:
    """The runner's device table on disk.  Thread-safe; every change is written at once."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, "devices.json")
        self._lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.problems: list[str] = []
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self.problems.append(f"{self.path}: unreadable ({e}); ignoring it")
            return
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("devices"), list):
            self.problems.append(f"{self.path}: not a ublk-runner state file of format {FORMAT}; ignoring it")
            return
        for item in raw["devices"]:
            try:
                e = Entry(**item)
                if not isinstance(e.dev_id, int) or e.dev_id < 0:
                    raise TypeError(f"bad dev_id {e.dev_id!r}")
            except TypeError as ex:
                self.problems.append(f"{self.path}: bad entry {item!r} ({ex}); ignoring it")
                continue
            self.entries[e.name] = e

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self.entries.get(name)

    def put(self, entry: Entry) -> None:
        with self._lock:
            self.entries[entry.name] = entry
            self._save()

    def drop(self, name: str) -> None:
        with self._lock:
            if self.entries.pop(name, None) is not None:
                self._save()

    def _save(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        data = {"format": FORMAT, "devices": [dataclasses.asdict(e) for e in self.entries.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".devices.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# What to do with a remembered device, decided from the kernel's view of it.
RECOVER = "recover"      # QUIESCED, ours, same layout: take it over
REPLACE = "replace"      # ours but unusable (DEAD, or the config changed): delete it, create anew
BUSY = "busy"            # a live process still serves it: leave it alone, do not start ours
FORGET = "forget"        # gone, or not ours: drop the entry, create anew


def classify(entry: Entry, digest: str) -> tuple[str, str]:
    """(action, reason) for a state entry, asking the kernel about its device."""
    try:
        info = ublk.device_info(entry.dev_id)
    except ublk.UblkError as e:
        if e.errno == errno.ENODEV:
            return FORGET, f"device {entry.dev_id} no longer exists"
        raise
    if not info.ours:
        return FORGET, f"device {entry.dev_id} now belongs to another program (not created by ublk-runner)"
    if info.state == "LIVE" and info.server_alive and info.pid != os.getpid():
        return BUSY, f"device {entry.dev_id} is still served by pid {info.pid}"
    if info.state != "QUIESCED":
        return REPLACE, f"device {entry.dev_id} is {info.state} and cannot be recovered"
    if entry.digest != digest:
        return REPLACE, f"device {entry.dev_id} was created from a different configuration"
    return RECOVER, f"device {entry.dev_id} is QUIESCED"

