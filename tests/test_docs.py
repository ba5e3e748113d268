"""The documentation: it builds without a single warning, and the example code
it shows works.

- ``docs/examples/handler`` (the handler guide's complete example) is a real
  distribution: pip-installed into a fresh venv layered over this project's
  environment, found by the runner's plugin loader through its entry point,
  validated by the config loader, and its handler reads and writes correctly
  through the handler API. Its own unit tests pass against the installed copy.
- ``docs/examples/handler_styles.py`` (sync, asyncio and Future-returning
  handlers) registers and serves requests.
- ``sphinx -W -n`` builds the docs (skipped only when Sphinx is not installed).

No kernel needed: these are host tests.
"""
from __future__ import annotations

import asyncio
import errno
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "examples" / "handler"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runner.handler import DeviceSpec, check_instance, validate_options  # noqa: E402
from runner.plugins import ENV_DISABLE_AUTOLOAD, Plugins  # noqa: E402


# ---------------------------------------------------------------------------
# the example handler distribution


def _layered_venv(venv: Path) -> Path:
    """A fresh venv that also sees this project's environment (ublk-runner,
    pluggy, PyYAML, pip, setuptools) through a .pth file, as if they were
    installed in it."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    vsite = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(vsite, "ublk_runner_env.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return py


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_DISABLE_AUTOLOAD)}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


INSTALLED_CHECK = textwrap.dedent("""
    import errno, json
    from runner.config import load_config
    from runner.errors import ConfigError
    from runner.handler import check_instance
    from runner.plugins import load_plugins

    out = {}
    p = load_plugins()
    out["errors"] = [str(f) for f in p.errors]
    out["plugins"] = [[i.name, i.distribution, i.version, list(i.handlers)] for i in p.list_plugins()]
    cls = p.registry.get("checksum-mem")
    out["module"] = cls.__module__ if cls else None

    with open("good.yaml", "w") as f:
        f.write("devices:\\n  - name: v0\\n    handler: checksum-mem\\n    size: 1M\\n"
                "    options: {chunk: 8K, fill: 7}\\n")
    dev = load_config("good.yaml", p.registry).devices[0]
    out["options"] = dev.options
    h = cls.open(dev.options, dev.spec())
    caps = check_instance(h, dev.spec())
    out["caps"] = {k: caps[k] for k in ("size", "can_write", "can_flush", "can_discard", "can_write_zeroes")}
    first = bytearray(4096)
    h.read(0, memoryview(first))
    h.write(8192, memoryview(b"\\x5a" * 4096), False)
    back = bytearray(8192)
    h.read(8192, memoryview(back))
    out["read_fill"] = first == b"\\x07" * 4096
    out["read_back"] = back == b"\\x5a" * 4096 + b"\\x07" * 4096
    h.data[20000] ^= 0xFF
    try:
        h.read(16384, memoryview(bytearray(512)))
        out["corrupt"] = "no error"
    except OSError as e:
        out["corrupt"] = errno.errorcode[e.errno]
    h.close()

    with open("bad.yaml", "w") as f:
        f.write("devices:\\n  - name: v1\\n    handler: checksum-mem\\n    size: 1M\\n"
                "    options: {chunk: 3K}\\n")
    try:
        load_config("bad.yaml", p.registry)
        out["bad"] = None
    except ConfigError as e:
        out["bad"] = e.messages
    print(json.dumps(out))
""")


def test_example_handler_package_installs_and_works(tmp_path):
    """pip-install docs/examples/handler into a fresh venv (offline, no build
    isolation), then check it the way the runner uses it."""
    py = _layered_venv(tmp_path / "venv")
    src = tmp_path / "example_src"  # build from a copy: setuptools writes build/ and *.egg-info
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = _clean_env()
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(src)],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if "No module named pip" in out or ("setuptools" in out and "No module named" in out):
            pytest.skip(f"pip cannot build offline here:\n{out[-2000:]}")
        pytest.fail(f"pip install failed:\n{out[-4000:]}")

    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([str(py), "-c", INSTALLED_CHECK], capture_output=True, text=True, env=env,
                       cwd=work, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["errors"] == []
    # found through its entry point, attributed to its distribution
    assert ["checksum", "ublk-runner-example-checksum", "1.0.0", ["checksum-mem"]] in res["plugins"]
    assert res["module"] == "ublk_example_checksum.handler"
    # the built-in handlers are still there
    assert any(p[0] == "file" and p[1] == "ublk-runner" for p in res["plugins"])
    assert res["options"] == {"chunk": 8192, "fill": 7, "verify": True}
    assert res["caps"] == {"size": 1 << 20, "can_write": True, "can_flush": False,
                           "can_discard": True, "can_write_zeroes": True}
    assert res["read_fill"] and res["read_back"]
    assert res["corrupt"] == "EIO"
    assert res["bad"] and "devices[0].options" in res["bad"][0] and "not a multiple of chunk" in res["bad"][0], res["bad"]

    # the package's own unit tests, against the installed copy (not the source tree)
    tests = tmp_path / "example_tests"
    shutil.copytree(EXAMPLE / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# docs/examples/handler_styles.py


def _load_styles():
    spec = importlib.util.spec_from_file_location("handler_styles_example", DOCS / "examples" / "handler_styles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_handler_styles_register_and_serve():
    mod = _load_styles()
    p = Plugins()
    assert p.register_plugin(mod, "styles")
    p._register_handlers()
    assert p.errors == []
    assert sorted(n for n in p.registry.names()) == ["styles-async", "styles-future", "styles-sync"]

    spec = DeviceSpec("s", size=1 << 20)
    for name in p.registry.names():
        cls = p.registry[name]
        options, errors = validate_options(cls.options_schema, {"delay_ms": 0} if name == "styles-async" else {})
        assert errors == []
        h = cls.open(options, spec)
        caps = check_instance(h, spec)
        assert caps["can_write"] and not caps["can_flush"]
        is_async = any(inspect.iscoroutinefunction(getattr(h, m)) for m in ("read", "write"))
        assert is_async == (name == "styles-async")  # what the runner uses to pick the asyncio path

        def finish(result):
            if inspect.isawaitable(result):
                return asyncio.run(_await(result))
            if result is not None:  # a Future: the runner waits for its callback
                assert hasattr(result, "add_done_callback")
                return result.result(timeout=10)
            return None

        finish(h.write(4096, memoryview(b"\x11" * 4096), False))
        buf = bytearray(8192)
        finish(h.read(0, memoryview(buf)))
        assert buf == bytes(4096) + b"\x11" * 4096, name
        h.close()


async def _await(aw):
    return await aw


# ---------------------------------------------------------------------------
# the Sphinx build


def test_docs_build_without_warnings(tmp_path):
    """Build the HTML docs with warnings as errors (-W) and nitpicky
    cross-reference checks (-n), into a temporary directory."""
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    r = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-n", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert r.returncode == 0, f"sphinx failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert (out / "index.html").exists()
    # the generated reference pages carry what the code says
    config = (out / "reference" / "config.html").read_text()
    for key in ("log_target", "max_io_size", "user_copy", "latency_us", "fail_ops"):
        assert key in config, key
    assert "check-config" in (out / "reference" / "cli.html").read_text()
