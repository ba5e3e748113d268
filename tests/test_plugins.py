"""Plugin layer: handler registry, entry-point loading, isolation of broken
plugins, the handler base class, plugin commands.  A real pip-installed
third-party distribution (the handler guide's docs/examples/handler) is
tested in tests/test_docs.py and served as a device in tests/device."""

from __future__ import annotations

import errno
import importlib.metadata
import itertools
import logging
import sys
import textwrap
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow plain `pytest` without an install
    sys.path.insert(0, str(ROOT))

from runner.handler import (  # noqa: E402
    DeviceSpec,
    Handler,
    HandlerContractError,
    Opt,
    SchemaError,
    check_instance,
    errno_of,
    validate_options,
)
from runner.hookspecs import hookimpl  # noqa: E402
from runner.plugins import ENV_DISABLE_AUTOLOAD, HandlerRegistry, Plugins, RegistryError, load_plugins  # noqa: E402



# ---------------------------------------------------------------------------
# helpers


def make_handler(hname: str, **attrs):
    ns = {"name": hname, "read": lambda self, offset, buf: None, **attrs}
    return type(f"H_{hname.replace('-', '_')}", (Handler,), ns)


_counter = itertools.count()


class FakeSite:
    """A directory on sys.path holding plugin modules and *.dist-info
    metadata, standing in for installed distributions. Only these
    distributions are visible to the loader while the fixture is active."""

    def __init__(self, root: Path):
        self.root = root
        self.tag = f"t{next(_counter)}"

    def module(self, name: str, source: str) -> str:
        modname = f"{name}_{self.tag}"
        (self.root / f"{modname}.py").write_text(textwrap.dedent(source))
        return modname

    def dist(self, dist_name: str, version: str, entry_points: dict[str, str]) -> None:
        d = self.root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (d / "entry_points.txt").write_text(f"[ublk_runner]\n{eps}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: real(path=[str(root)]))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    return FakeSite(root)


PLUGIN_SRC = """
    from runner.handler import Handler, Opt
    from runner.hookspecs import hookimpl

    class H(Handler):
        name = {hname!r}
        options_schema = {{"x": Opt(int, default=1)}}
        def read(self, offset, buf):
            pass

    @hookimpl
    def ublk_runner_register_handlers(registry):
        registry.add(H)
"""


def plugin_src(hname: str) -> str:
    return PLUGIN_SRC.format(hname=hname)


# ---------------------------------------------------------------------------
# registry


def test_registry_add_and_lookup():
    r = HandlerRegistry()
    H = make_handler("mem")
    assert r.add(H) is H
    assert r.get("mem") is H and r["mem"] is H and "mem" in r and len(r) == 1
    assert r.names() == ["mem"] and list(r) == ["mem"] and r.get("nope") is None


def test_registry_duplicate_name_names_both_distributions():
    r = HandlerRegistry()
    with r.adding_for("builtin-file", "ublk-runner", "0.1.0"):
        r.add(make_handler("file"))
    with pytest.raises(RegistryError) as ei, r.adding_for("evil", "evil-dist", "6.6"):
        r.add(make_handler("file"))
    msg = str(ei.value)
    assert msg.startswith("plugin 'evil' (distribution evil-dist 6.6): handler name 'file'")
    assert "already registered by plugin 'builtin-file' (distribution ublk-runner 0.1.0)" in msg


def test_registry_api_major_mismatch():
    r = HandlerRegistry()
    with pytest.raises(RegistryError) as ei, r.adding_for("future", "future-dist", "2.0"):
        r.add(make_handler("future", API_VERSION=(2, 0)))
    assert str(ei.value) == (
        "plugin 'future' (distribution future-dist 2.0): H_future needs handler API 2.0, this runner provides 1.0"
    )
    with pytest.raises(RegistryError, match=r"needs handler API 1\.7, this runner provides 1\.0"):
        r.add(make_handler("newer", API_VERSION=(1, 7)))
    with pytest.raises(RegistryError, match=r"must be a \(major, minor\) tuple"):
        r.add(make_handler("weird", API_VERSION="1.0"))
    assert len(r) == 0


@pytest.mark.parametrize(
    "cls,match",
    [
        (object, "is not a subclass of runner.handler.Handler"),
        (make_handler("Bad Name"), "is not a valid handler name"),
        (make_handler(""), "is not a valid handler name"),
        (make_handler("t", thread_model="threads"), "thread_model = 'threads'"),
        (make_handler("s", options_schema={"path": str}), r"options_schema\['path'\] must be an Opt"),
        (make_handler("s2", options_schema=[]), "options_schema must be a dict"),
        (make_handler("n", native_target=("spdk", {})), "unknown native target 'spdk'"),
        (type("NoRead", (Handler,), {"name": "noread"}), "must implement read"),
    ],
)
def test_registry_rejects_bad_classes(cls, match):
    with pytest.raises(RegistryError, match=match):
        HandlerRegistry().add(cls)


def test_registry_accepts_native_handler_without_read():
    r = HandlerRegistry()
    r.add(type("N", (Handler,), {"name": "nullc", "native_target": ("null", {})}))
    assert "nullc" in r


def test_adding_for_rolls_back_on_error():
    r = HandlerRegistry()
    with pytest.raises(RuntimeError), r.adding_for("p"):
        r.add(make_handler("one"))
        raise RuntimeError("boom")
    assert len(r) == 0


# ---------------------------------------------------------------------------
# option schema


def test_opt_schema_errors():
    with pytest.raises(SchemaError, match="both required and have a default"):
        Opt(str, required=True, default="x")
    with pytest.raises(SchemaError, match="option type must be"):
        Opt(dict)
    with pytest.raises(SchemaError, match="default 'x': expected an integer"):
        Opt(int, default="x")
    with pytest.raises(SchemaError, match="min/max only apply"):
        Opt(str, min=1)
    with pytest.raises(SchemaError, match="unknown option type"):
        Opt("complex")


def test_validate_options_types_and_defaults():
    schema = {
        "path": Opt(str, required=True),
        "n": Opt("int", default=3, min=0, max=10),
        "ratio": Opt(float, default=0.5),
        "cache": Opt("size", default="1M"),
        "hosts": Opt(list[str], default=["a"]),
        "sizes": Opt(list["size"]),
        "opt": Opt(str),
    }
    out, errs = validate_options(schema, {"path": "/x", "ratio": 2, "sizes": ["4K", 512]})
    assert errs == []
    assert out == {"path": "/x", "n": 3, "ratio": 2.0, "cache": 1 << 20, "hosts": ["a"], "sizes": [4096, 512], "opt": None}
    out2, _ = validate_options(schema, {"path": "/y"})
    out2["hosts"].append("b")
    assert schema["hosts"].default == ["a"]  # defaults are copied, not shared
    _, errs = validate_options(schema, {"n": 11, "sizes": ["4K", "huge"], "ratio": True}, "h")
    assert errs == [
        (("n",), "11 is out of range (expected 0..10)"),
        (("sizes", 1), "'huge' is not a size (expected a number with an optional K/M/G/T suffix, e.g. 512M)"),
        (("ratio",), "expected a number, got boolean true (YAML reads yes/no/on/off/true/false as booleans)"),
        ((), "missing required option 'path' for handler 'h'"),
    ]


# ---------------------------------------------------------------------------
# handler base class


class Mem(Handler):
    name = "memtest"

    def read(self, offset, buf):
        buf[:] = b"\x01" * len(buf)

    def write(self, offset, data, fua):
        pass

    def discard(self, offset, length):
        pass


def test_capabilities_follow_overrides():
    spec = DeviceSpec("d", size=1 << 20)
    h = Mem.open({}, spec)
    assert (h.can_write, h.can_flush, h.can_discard, h.can_write_zeroes, h.can_fua) == (True, False, True, False, False)
    assert (h.size, h.logical_block_size, h.physical_block_size) == (1 << 20, 512, 512)
    h.can_discard = False  # instance override is allowed
    info = check_instance(h, spec)
    assert info["can_discard"] is False and info["can_write"] is True and info["size"] == 1 << 20
    ro = check_instance(Mem.open({}, DeviceSpec("d", size=4096, read_only=True)), DeviceSpec("d", 4096, read_only=True))
    assert ro["can_write"] is False


def test_check_instance_rejects_bad_geometry():
    h = Mem.open({}, DeviceSpec("d"))  # no size in config, handler did not set one
    with pytest.raises(HandlerContractError, match="size is None"):
        check_instance(h, DeviceSpec("d"))
    h.size, h.logical_block_size = 1000, 512
    with pytest.raises(HandlerContractError, match="not a multiple of logical_block_size"):
        check_instance(h, DeviceSpec("d"))
    h.size, h.physical_block_size = 4096, 256
    with pytest.raises(HandlerContractError, match="physical_block_size 256"):
        check_instance(h, DeviceSpec("d"))
    with pytest.raises(HandlerContractError, match="not a Handler instance"):
        check_instance(object(), DeviceSpec("d"))


def test_default_io_methods_raise_errno():
    h = make_handler("plain").open({}, DeviceSpec("d", 4096))
    for call, code in (
        (lambda: h.write(0, memoryview(b"x"), False), errno.EROFS),
        (h.flush, errno.EOPNOTSUPP),
        (lambda: h.discard(0, 512), errno.EOPNOTSUPP),
        (lambda: h.write_zeroes(0, 512, True), errno.EOPNOTSUPP),
    ):
        with pytest.raises(OSError) as ei:
            call()
        assert errno_of(ei.value) == code
    assert errno_of(ValueError("x")) == errno.EIO
    assert errno_of(OSError("no errno")) == errno.EIO
    assert errno_of(FileNotFoundError(errno.ENOENT, "gone")) == errno.ENOENT


# ---------------------------------------------------------------------------
# loading


def test_load_from_entry_points_records_distribution(site):
    mod = site.module("goodplug", plugin_src("good"))
    site.dist("good-dist", "1.2.3", {"good": mod})
    p = load_plugins()
    assert p.errors == []
    assert "good" in p.registry
    (info,) = p.list_plugins()
    assert (info.name, info.module, info.distribution, info.version, info.handlers) == (
        "good", mod, "good-dist", "1.2.3", ("good",),
    )
    assert p.registry.owner("good") == ("good", "good-dist", "1.2.3")


def test_broken_plugin_import_is_skipped_and_logged(site, caplog):
    good = site.module("okplug", plugin_src("ok"))
    bad = site.module("brokenplug", "import does_not_exist_anywhere\n")
    site.dist("aaa-broken", "0.1", {"broken": bad})
    site.dist("zzz-ok", "2.0", {"ok": good})
    with caplog.at_level(logging.ERROR, logger="ublk_runner.plugins"):
        p = load_plugins()
    assert p.registry.names() == ["ok"]
    (f,) = p.errors
    assert (f.name, f.distribution, f.version, f.stage) == ("broken", "aaa-broken", "0.1", "import")
    assert "ModuleNotFoundError" in f.message and "does_not_exist_anywhere" in f.message
    assert "plugin 'broken' (distribution aaa-broken 0.1) failed to import and is skipped" in caplog.text
    assert [i.name for i in p.list_plugins()] == ["ok"]


def test_plugin_raising_in_hook_is_withdrawn(site, caplog):
    src = """
        from runner.handler import Handler
        from runner.hookspecs import hookimpl

        class A(Handler):
            name = "half-a"
            def read(self, o, b): pass

        @hookimpl
        def ublk_runner_register_handlers(registry):
            registry.add(A)
            raise RuntimeError("backend library missing")
    """
    site.dist("bad-hook", "1.0", {"badhook": site.module("badhook", src)})
    site.dist("good-dist", "1.0", {"good": site.module("goodplug", plugin_src("good"))})
    with caplog.at_level(logging.ERROR, logger="ublk_runner.plugins"):
        p = load_plugins()
    assert p.registry.names() == ["good"]  # half-a was rolled back
    (f,) = p.errors
    assert f.stage == "hook" and f.message == "RuntimeError: backend library missing"
    assert "plugin 'badhook' (distribution bad-hook 1.0) failed to register its handlers" in caplog.text


def test_builtins_load_first_and_win_name_conflicts(site):
    # A third-party distribution sorting before 'ublk-runner' tries to take 'null'.
    site.dist("aardvark", "9.9", {"aard": site.module("aard", plugin_src("null"))})
    site.dist("ublk-runner", "0.1.0", {"null": site.module("builtin_null", plugin_src("null"))})
    p = load_plugins()
    assert [i.name for i in p.list_plugins()] == ["null", "aard"]
    assert p.registry.owner("null") == ("null", "ublk-runner", "0.1.0")
    (f,) = p.errors
    assert f.name == "aard" and f.stage == "hook"
    assert f.message.startswith("handler name 'null'")
    assert "already registered by plugin 'null' (distribution ublk-runner 0.1.0)" in f.message


def test_api_major_mismatch_plugin_is_skipped(site):
    src = plugin_src("future").replace("name = 'future'", "name = 'future'\n        API_VERSION = (2, 0)")
    site.dist("future-dist", "3.0", {"future": site.module("futureplug", src)})
    site.dist("good-dist", "1.0", {"good": site.module("goodplug", plugin_src("good"))})
    p = load_plugins()
    assert p.registry.names() == ["good"]
    (f,) = p.errors
    assert str(f) == (
        "plugin 'future' (distribution future-dist 3.0): H needs handler API 2.0, this runner provides 1.0"
    )


def test_unknown_hook_and_bad_signature_are_rejected(site):
    typo = """
        from runner.hookspecs import hookimpl
        @hookimpl
        def ublk_runner_register_handler(registry):  # typo: missing 's'
            pass
    """
    badsig = """
        from runner.hookspecs import hookimpl
        @hookimpl
        def ublk_runner_device_started(device, extra):
            pass
    """
    site.dist("typo-dist", "1", {"typo": site.module("typo", typo)})
    site.dist("sig-dist", "1", {"sig": site.module("sig", badsig)})
    site.dist("good-dist", "1", {"good": site.module("goodplug", plugin_src("good"))})
    p = load_plugins()
    assert p.registry.names() == ["good"]
    assert sorted((f.name, f.stage) for f in p.errors) == [("sig", "register"), ("typo", "register")]
    assert any("unknown hook 'ublk_runner_register_handler'" in f.message for f in p.errors)
    assert [i.name for i in p.list_plugins()] == ["good"]
    assert p.pm.get_plugin("typo") is None and p.pm.get_plugin("sig") is None


def test_block_and_env_disable_and_extra(site, monkeypatch):
    site.dist("one-dist", "1", {"one": site.module("one", plugin_src("one"))})
    site.dist("two-dist", "1", {"two": site.module("two", plugin_src("two"))})
    assert load_plugins(block=["one"]).registry.names() == ["two"]
    assert load_plugins(autoload=False).registry.names() == []
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert load_plugins().registry.names() == []
    # explicit names still load: an entry-point name, or a module name
    modname = site.module("direct", plugin_src("direct"))
    p = load_plugins(extra=["two", modname])
    assert p.registry.names() == ["direct", "two"]
    infos = {i.name: i for i in p.list_plugins()}
    assert infos["two"].distribution == "two-dist" and infos[modname].distribution is None
    # blocking wins over an explicit request
    assert load_plugins(extra=["two"], block=["two"]).registry.names() == []
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "0")
    assert load_plugins().registry.names() == ["one", "two"]


def test_extra_module_that_fails_to_import(site):
    p = load_plugins(autoload=False, extra=["no_such_plugin_module_xyz"])
    (f,) = p.errors
    assert (f.name, f.distribution, f.stage) == ("no_such_plugin_module_xyz", None, "import")


def test_same_entry_point_name_in_two_distributions(site):
    site.dist("first-dist", "1", {"dup": site.module("dupa", plugin_src("dupa"))})
    site.dist("second-dist", "1", {"dup": site.module("dupb", plugin_src("dupb"))})
    p = load_plugins()
    assert p.registry.names() == ["dupa"]
    (f,) = p.errors
    assert f.stage == "duplicate" and f.distribution == "second-dist" and "first-dist" in f.message


def test_notify_isolates_failures(caplog):
    calls = []
    a = types.ModuleType("plug_a")
    b = types.ModuleType("plug_b")

    @hookimpl
    def started_a(device):
        raise RuntimeError("a broke")

    @hookimpl
    def started_b(device):
        calls.append(("b", device))

    a.ublk_runner_device_started = started_a
    b.ublk_runner_device_started = started_b
    p = Plugins()
    assert p.register_plugin(a, "a") and p.register_plugin(b, "b")
    with caplog.at_level(logging.ERROR, logger="ublk_runner.plugins"):
        p.notify("ublk_runner_device_started", device="dev0")
    assert calls == [("b", "dev0")]
    assert "plugin 'a' raised in ublk_runner_device_started" in caplog.text


def test_hookimpl_may_take_a_subset_of_arguments():
    m = types.ModuleType("plug_noargs")
    seen = []

    @hookimpl
    def ublk_runner_device_stopped():
        seen.append(1)

    m.ublk_runner_device_stopped = ublk_runner_device_stopped
    p = Plugins()
    assert p.register_plugin(m, "noargs")
    p.notify("ublk_runner_device_stopped", device=object())
    assert seen == [1]


# ---------------------------------------------------------------------------
# plugin commands (ublk_runner_add_commands)


def test_plugin_commands_added_refused_and_isolated(site, capsys):
    from runner import cli
    adds = """
        from runner.hookspecs import hookimpl

        def hello(args):
            if args.who == "nobody":
                raise RuntimeError("nobody to greet")
            print("hello", args.who)
            return 3

        @hookimpl
        def ublk_runner_add_commands(subparsers):
            p = subparsers.add_parser("hello", help="greet")
            p.add_argument("who")
            p.set_defaults(func=hello)
    """
    clash = """
        from runner.hookspecs import hookimpl

        @hookimpl
        def ublk_runner_add_commands(subparsers):
            subparsers.add_parser("list").set_defaults(func=lambda args: 99)
    """
    raises = """
        from runner.hookspecs import hookimpl

        @hookimpl
        def ublk_runner_add_commands(subparsers):
            raise ImportError("libfoo.so.1 missing")
    """
    site.dist("hello-dist", "1.0", {"hello": site.module("helloplug", adds)})
    site.dist("clash-dist", "1.0", {"clash": site.module("clashplug", clash)})
    site.dist("raise-dist", "2.0", {"raiser": site.module("raiseplug", raises)})
    assert cli.main(["hello", "world"]) == 3
    out, err = capsys.readouterr()
    assert out == "hello world\n"
    assert "plugin 'clash' (distribution clash-dist 1.0) could not add its commands" in err
    assert "conflicting subparser: list" in err
    assert "plugin 'raiser' (distribution raise-dist 2.0) could not add its commands: libfoo.so.1 missing" in err
    # the built-in command kept its meaning
    assert cli.build_parser().parse_args(["list"]).func is cli.cmd_list
    assert cli.main(["hello", "nobody"]) == 1
    assert "ublk-runner: nobody to greet" in capsys.readouterr().err


def test_builtin_commands_do_not_load_plugins(site, capsys, monkeypatch, tmp_path):
    """``run`` loads the plugins itself (with the config's autoload/block): the command line
    must not load them a second time for a built-in command, only for a plugin's command or
    the top-level help."""
    from runner import cli, plugins as plugins_mod
    adds = """
        from runner.hookspecs import hookimpl

        @hookimpl
        def ublk_runner_add_commands(subparsers):
            subparsers.add_parser("hello", help="greet").set_defaults(func=lambda args: 5)
    """
    site.dist("hello-dist", "1.0", {"hello": site.module("helloplug2", adds)})
    calls = []
    real = plugins_mod.load_plugins
    monkeypatch.setattr(plugins_mod, "load_plugins", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cli.main(["features", "--json"]) in (0, 1)
    assert calls == []
    assert cli.main(["hello"]) == 5
    assert len(calls) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "hello" in capsys.readouterr().out
    assert len(calls) == 2
