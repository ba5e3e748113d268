"""qcow2 plugin: a pure-Python qcow2 v2/v3 read/write engine."""

from .engine import Qcow2Error, Qcow2Image, create

__all__ = ["Qcow2Error", "Qcow2Image", "create"]
