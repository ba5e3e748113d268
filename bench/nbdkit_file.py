# nbdkit Python plugin serving a file, the peer of ublk-runner's file handler in Python mode.
# nbdkit python bench/nbdkit_file.py file=PATH
import os

import nbdkit

API_VERSION = 2
path = None


def config(key, value):
    global path
    if key == "file":
        path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def get_size(h):
    return os.fstat(h).st_size


def pread(h, buf, offset, flags):
    os.preadv(h, [buf], offset)


def pwrite(h, buf, offset, flags):
    os.pwritev(h, [buf], offset)


def flush(h, flags):
    os.fdatasync(h)
