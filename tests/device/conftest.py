import shutil
import subprocess

import pytest

from runner import ublk


@pytest.fixture(autouse=True)
def no_device_left_behind():
    """Every device test must leave the kernel without devices of ours."""
    yield
    if not ublk.available():
        return
    left = [d for d in ublk.list_devices() if d.ours]
    if left:
        ublk.cleanup_dead(include_quiesced=True)
        for d in ublk.list_devices():
            if d.ours:
                try:
                    ublk._control().command("STOP_DEV", d.dev_id, timeout=5)
                except ublk.UblkError:
                    pass
                ublk._control().command("DEL_DEV_ASYNC", d.dev_id, timeout=5)
        pytest.fail(f"test left ublk devices behind: {left}")


@pytest.fixture(scope="session", autouse=True)
def ext4_module():
    subprocess.run(["modprobe", "ext4"], capture_output=True)


@pytest.fixture
def runner(tmp_path):
    """start(yaml_text, **kw) -> a running RunnerProcess; every one must stop with exit 0."""
    from .runnerproc import RunnerProcess
    started = []

    def start(yaml_text, **kw):
        r = RunnerProcess(tmp_path, yaml_text, **kw)
        started.append(r)
        return r
    yield start
    for r in started:
        if r.proc.poll() is None:
            assert r.stop() == 0, r.log()
        elif not r.killed and r.proc.returncode != 0:
            pytest.fail(f"runner exited with {r.proc.returncode}:\n{r.log()}")


@pytest.fixture
def fio():
    path = shutil.which("fio")
    if not path:
        pytest.skip("fio not installed")
    return path
