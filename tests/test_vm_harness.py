"""Host-side checks of tests/vm/run (the qemu/TCG harness that runs commands under the 6.12 kernel).

Booting costs several seconds under TCG, so the guest-side facts come from a single boot: one guest
script prints a few facts, writes a file into the repository, and exits 7. The 124/125 exits are
checked without a full boot (qemu fails at once, or is killed after 2 s).
"""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "tests" / "vm" / "run"

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"),
    pytest.mark.skipif(os.environ.get("RUN_IN_VM") == "1", reason="already inside the test VM"),
]

GUEST_SCRIPT = r"""
printf 'arg=<%s>\n' "$@"
printf 'uname=%s\n' "$(uname -r)"
if [ -c /dev/ublk-control ]; then echo ublk-control=yes; else echo ublk-control=no; fi
printf 'in_vm=%s\n' "$RUN_IN_VM"
printf 'cwd=%s\n' "$(pwd)"
echo "written in the guest" > "$PROBE"
echo "this goes to stderr" >&2
exit 7
"""


@pytest.fixture(scope="module")
def vm_result():
    probe = REPO / f".vm-harness-probe-{uuid.uuid4().hex}"
    env = dict(os.environ, PROBE=str(probe), UBLK_VM_TIMEOUT="900")
    try:
        proc = subprocess.run(
            [str(RUN), "sh", "-c", GUEST_SCRIPT, "sh", "a b", 'c "d"  e', "$HOME"],
            cwd=REPO / "tests",
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1000,
        )
        written = probe.read_text() if probe.exists() else None
    finally:
        probe.unlink(missing_ok=True)
    return proc, written


def test_exit_code_comes_back(vm_result):
    proc, _ = vm_result
    assert proc.returncode == 7, proc.stderr


def test_arguments_keep_spaces_and_quotes(vm_result):
    proc, _ = vm_result
    args = [line for line in proc.stdout.splitlines() if line.startswith("arg=")]
    assert args == ["arg=<a b>", 'arg=<c "d"  e>', "arg=<$HOME>"]


def test_stdout_and_stderr_are_separate(vm_result):
    proc, _ = vm_result
    assert "this goes to stderr" in proc.stderr
    assert "this goes to stderr" not in proc.stdout
    assert "uname=" not in proc.stderr


def test_cwd_and_marker_variable(vm_result):
    proc, _ = vm_result
    assert f"cwd={REPO / 'tests'}" in proc.stdout.splitlines()
    assert "in_vm=1" in proc.stdout.splitlines()


def test_guest_write_to_repo_is_visible_on_host(vm_result):
    _, written = vm_result
    assert written == "written in the guest\n"


def test_guest_runs_the_612_kernel(vm_result):
    proc, _ = vm_result
    unames = [line.split("=", 1)[1] for line in proc.stdout.splitlines() if line.startswith("uname=")]
    assert len(unames) == 1
    assert unames[0].startswith("6.12.") and unames[0].endswith("+deb12-amd64")
    assert unames[0] != os.uname().release


def test_ublk_control_exists_in_guest(vm_result):
    proc, _ = vm_result
    assert "ublk-control=yes" in proc.stdout.splitlines()


def _run_quick(tmp_path, extra_env, *cmd, timeout=120):
    # TMPDIR: the harness copies the console log of a failed run there.
    env = dict(os.environ, TMPDIR=str(tmp_path), **extra_env)
    return subprocess.run(
        [str(RUN), *cmd], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def test_vm_ending_without_status_gives_125(tmp_path):
    # qemu rejects the memory size and exits at once: no boot, no status -> 125 plus console tail.
    proc = _run_quick(tmp_path, {"UBLK_VM_MEM": "bogus"}, "true")
    assert proc.returncode == 125
    assert "without reporting a status" in proc.stderr
    assert list(tmp_path.glob("ublk-vm-console.*.log"))


def test_host_side_timeout_gives_124(tmp_path):
    # Killed long before the guest kernel reaches /init, so this costs about 2 s.
    proc = _run_quick(tmp_path, {"UBLK_VM_TIMEOUT": "2"}, "true")
    assert proc.returncode == 124
    assert "timed out after 2s" in proc.stderr
