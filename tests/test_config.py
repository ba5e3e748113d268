"""Config layer: YAML -> dataclasses, with file:line:key error messages."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow plain `pytest` without an install
    sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

from runner.config import (  # noqa: E402
    Config,
    DeviceConfig,
    GlobalConfig,
    device_digest,
    load_config,
    load_global,
    reload_plan,
    validate,
)
from runner.errors import ConfigError  # noqa: E402
from runner.handler import SIZE, Handler, Opt, format_size, parse_size  # noqa: E402
from runner.plugins import HandlerRegistry  # noqa: E402


# ---------------------------------------------------------------------------
# fixtures: a registry with stand-ins for the built-in handlers


class FileH(Handler):
    name = "file"
    options_schema = {
        "path": Opt(str, required=True, help="backing file or block device"),
        "direct": Opt(bool, default=False),
        "cache": Opt(SIZE, default="64M"),
        "mode": Opt(str, choices=["rw", "ro"], default="rw"),
    }

    def read(self, offset, buf):
        pass


class NullH(Handler):
    name = "null"
    size_required = True
    options_schema = {"latency_us": Opt(int, default=0, min=0)}

    def read(self, offset, buf):
        buf[:] = bytes(len(buf))


class PickyH(Handler):
    name = "picky"
    options_schema = {"lo": Opt(int, default=0), "hi": Opt(int, default=10)}

    @classmethod
    def check_config(cls, options, device):
        if options["lo"] > options["hi"]:
            raise ValueError(f"lo ({options['lo']}) must not exceed hi ({options['hi']})")

    def read(self, offset, buf):
        pass


@pytest.fixture
def registry():
    r = HandlerRegistry()
    for cls in (FileH, NullH, PickyH):
        r.add(cls)
    return r


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def errors_of(tmp_path, registry, text) -> tuple[str, list[str]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, registry)
    return path, ei.value.messages


def one_error(tmp_path, registry, text) -> str:
    path, msgs = errors_of(tmp_path, registry, text)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(path + ":"), msgs[0]
    return msgs[0][len(path):]  # ":LINE: key: message"


# ---------------------------------------------------------------------------
# good configs


def test_defaults_filled_in(tmp_path, registry):
    cfg = load_config(
        write(
            tmp_path,
            """
            devices:
              - name: d0
                handler: file
                options: {path: /tmp/x.img}
            """,
        ),
        registry,
    )
    assert cfg.global_ == GlobalConfig()
    assert cfg.global_.control_socket == "/run/ublk-runner/control.sock"
    assert cfg.global_.metrics.prometheus_addr == "127.0.0.1"
    assert cfg.global_.plugins.autoload is True
    (d,) = cfg.devices
    assert d == DeviceConfig(
        name="d0",
        handler="file",
        options={"path": "/tmp/x.img", "direct": False, "cache": 64 << 20, "mode": "rw"},
    )
    assert (d.size, d.id, d.queues, d.depth, d.block_size, d.physical_block_size) == (None, -1, 1, 128, 512, 512)
    assert (d.max_io_size, d.read_only, d.recovery, d.request_timeout, d.isolate, d.user_copy) == (
        1 << 20, False, "auto", 30.0, False, "auto",
    )
    assert d.line == 2
    spec = d.spec()
    assert spec.name == "d0" and spec.size is None and spec.logical_block_size == 512


def test_full_config(tmp_path, registry):
    cfg = load_config(
        write(
            tmp_path,
            """
            runner:
              log_level: DEBUG
              log_target: /var/log/ublk-runner.log
              control_socket: /tmp/ctl.sock
              state_dir: /tmp/state
              metrics: {prometheus_port: 9477, prometheus_addr: 0.0.0.0}
              plugins: {autoload: off, block: [rbd, qcow2]}
            devices:
              - name: big.disk-1
                handler: "null"
                size: 1T
                id: 7
                queues: 4
                depth: 256
                block_size: 4K
                physical_block_size: 4096
                max_io_size: 2MiB
                read_only: yes
                recovery: reissue
                request_timeout: 2.5
                isolate: true
                user_copy: false
                options: {latency_us: 50}
            """,
        ),
        registry,
    )
    g = cfg.global_
    assert (g.log_level, g.log_target, g.control_socket, g.state_dir) == (
        "debug", "/var/log/ublk-runner.log", "/tmp/ctl.sock", "/tmp/state",
    )
    assert g.metrics.prometheus_port == 9477 and g.metrics.prometheus_addr == "0.0.0.0"
    assert g.plugins.autoload is False and g.plugins.block == ("rbd", "qcow2")
    (d,) = cfg.devices
    assert d.size == 1 << 40 and d.id == 7 and d.queues == 4 and d.depth == 256
    assert d.block_size == 4096 and d.physical_block_size == 4096 and d.max_io_size == 2 << 20
    assert d.read_only is True and d.recovery == "reissue" and d.request_timeout == 2.5
    assert d.isolate is True and d.user_copy is False and d.options == {"latency_us": 50}


def test_empty_file_and_empty_devices_are_fine(tmp_path, registry):
    assert load_config(write(tmp_path, "", "a.yaml"), registry).devices == []
    assert load_config(write(tmp_path, "# nothing\n", "b.yaml"), registry).devices == []
    assert load_config(write(tmp_path, "devices: []\n", "c.yaml"), registry).devices == []
    cfg = load_config(write(tmp_path, "runner:\ndevices:\n", "d.yaml"), registry)
    assert cfg.devices == [] and cfg.global_ == GlobalConfig()


def test_null_means_default(tmp_path, registry):
    cfg = load_config(
        write(
            tmp_path,
            """
            devices:
              - {name: a, handler: file, queues: ~, size: null, options: {path: /x, direct: null}}
            """,
        ),
        registry,
    )
    assert cfg.devices[0].queues == 1 and cfg.devices[0].size is None
    assert cfg.devices[0].options["direct"] is False


def test_yaml_anchors_and_merge_keys(tmp_path, registry):
    # 'x-common' is not a known top-level key, so anchors live inside devices:
    cfg = load_config(
        write(
            tmp_path,
            """
            devices:
              - &common
                name: a
                handler: "null"
                size: 1G
                queues: 2
              - <<: *common
                name: b
                queues: 4
            """,
            "m.yaml",
        ),
        registry,
    )
    a, b = cfg.devices
    assert (a.name, a.queues, b.name, b.queues, b.size) == ("a", 2, "b", 4, 1 << 30)


def test_example_config_parses(registry):
    cfg = load_config(ROOT / "conf" / "example.yaml", registry)
    names = [d.name for d in cfg.devices]
    assert names == ["data0", "null0"]
    assert cfg.devices[0].handler == "file" and cfg.devices[0].options["direct"] is True
    assert cfg.devices[1].handler == "null" and cfg.devices[1].size == 1 << 40


def test_validate_plain_dict_without_registry():
    cfg = validate({"devices": [{"name": "a", "handler": "whatever", "size": "1M", "options": {"k": 1}}]}, "inline")
    assert isinstance(cfg, Config) and cfg.path == "inline"
    assert cfg.devices[0].size == 1 << 20 and cfg.devices[0].options == {"k": 1}
    with pytest.raises(ConfigError) as ei:
        validate({"devices": [{"name": "a", "handler": "x", "size": "1Q"}]}, "inline")
    assert ei.value.messages == [
        "inline: devices[0].size: '1Q' is not a size (expected a number with an optional K/M/G/T suffix, e.g. 512M)"
    ]


# ---------------------------------------------------------------------------
# malformed configs: each one names file, line and key


def test_bad_yaml_syntax(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: file
           size: 1G
        """,
    )
    assert msg == (
        ":4: invalid YAML at column 4: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block collection that starts at line 2)"
    )


def test_tab_indentation_hint(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n\t- name: a\n")
    assert msg.startswith(":2: invalid YAML") and "tabs" in msg, msg


def test_multiple_documents(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices: []\n---\ndevices: []\n")
    assert msg.startswith(":2: invalid YAML at column 1: ") and "single document" in msg, msg


def test_top_level_not_a_mapping(tmp_path, registry):
    msg = one_error(tmp_path, registry, "- name: a\n  handler: file\n")
    assert msg == (
        ":1: the top level must be a mapping with 'runner:' and 'devices:', got a list"
    )


def test_unknown_top_level_key_suggests(tmp_path, registry):
    assert one_error(tmp_path, registry, "devics: []\n") == ":1: devics: unknown key; did you mean 'devices'?"
    assert one_error(tmp_path, registry, "global:\n  log_level: info\n") == (
        ":1: global: unknown key; did you mean 'runner'?"
    )


def test_unknown_device_key_suggests(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            queue: 2
        """,
    )
    assert msg == ":5: devices[0].queue: unknown key; did you mean 'queues'?"


def test_unknown_key_without_close_match_lists_known(tmp_path, registry):
    msg = one_error(tmp_path, registry, "runner:\n  metrics:\n    zzz: 1\n")
    assert msg == ":3: runner.metrics.zzz: unknown key (expected one of: prometheus_addr, prometheus_port)"


def test_bad_size(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 10X
        """,
    )
    assert msg == (
        ":4: devices[0].size: '10X' is not a size "
        "(expected a number with an optional K/M/G/T suffix, e.g. 512M)"
    )


def test_fractional_and_decimal_sizes_rejected(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        devices:
          - {name: a, handler: "null", size: 1.5G}
          - {name: b, handler: "null", size: 10GB}
          - {name: c, handler: "null", size: -4096}
        """,
    )
    assert msgs == [
        f"{path}:2: devices[0].size: '1.5G' is not a size (fractions are not accepted; use a smaller unit, e.g. 1536M instead of 1.5G)",
        f"{path}:3: devices[1].size: '10GB' is not a size ('GB' is ambiguous; write 10G or 10GiB for powers of 1024)",
        f"{path}:4: devices[2].size: -4096 is not a size (must not be negative)",
    ]


def test_bool_where_int_expected(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            queues: yes
        """,
    )
    assert msg == (
        ":5: devices[0].queues: expected an integer, got boolean true "
        "(YAML reads yes/no/on/off/true/false as booleans)"
    )


def test_string_where_int_expected(tmp_path, registry):
    msg = one_error(tmp_path, registry, 'devices:\n  - {name: a, handler: "null", size: 1G, depth: "64"}\n')
    assert msg == ":2: devices[0].depth: expected an integer, got '64'"


def test_number_where_string_expected(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n  - name: 42\n    handler: file\n    options: {path: /x}\n")
    assert msg == ":2: devices[0].name: expected a string, got integer 42 (quote it to make it a string)"


def test_bool_where_string_expected(tmp_path, registry):
    msg = one_error(
        tmp_path, registry, "devices:\n  - name: a\n    handler: picky\n    recovery: no\n"
    )
    assert msg == (
        ":4: devices[0].recovery: expected a string, got boolean false "
        "(YAML reads yes/no/on/off/true/false as booleans; quote it if you meant text)"
    )


def test_out_of_range_and_bad_choices(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            queues: 65
            depth: 0
            block_size: 3000
            recovery: restart
            id: 1048576
            max_io_size: 64M
            request_timeout: 0
            user_copy: maybe
        """,
    )
    assert msgs == [
        f"{path}:5: devices[0].queues: 65 is out of range (expected 1..64)",
        f"{path}:6: devices[0].depth: 0 is out of range (expected 1..4096)",
        f"{path}:7: devices[0].block_size: 3000 is not one of 512, 1K, 2K, 4K",
        f"{path}:8: devices[0].recovery: 'restart' is not one of 'auto', 'none', 'requeue', 'reissue'",
        f"{path}:9: devices[0].id: 1048576 is out of range (expected -1..1048575)",
        f"{path}:10: devices[0].max_io_size: 64M is out of range (expected 4K..32M)",
        f"{path}:11: devices[0].request_timeout: 0.0 is not a timeout (expected a number of seconds > 0)",
        f"{path}:12: devices[0].user_copy: expected auto, true or false, got 'maybe'",
    ]


def test_max_io_size_multiple_of_4k(tmp_path, registry):
    msg = one_error(tmp_path, registry, 'devices:\n  - {name: a, handler: "null", size: 1G, max_io_size: 6000}\n')
    assert msg == ":2: devices[0].max_io_size: 6000 is not a multiple of 4K"


def test_unknown_handler_lists_known(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: fiel
        """,
    )
    assert msg == ":3: devices[0].handler: unknown handler 'fiel' (known handlers: file, null, picky); did you mean 'file'?"


def test_unquoted_null_handler(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n  - name: a\n    handler: null\n    size: 1G\n")
    assert msg.startswith(":3: devices[0].handler: no value (YAML reads null") and 'handler: "null"' in msg


def test_missing_name_and_handler(tmp_path, registry):
    path, msgs = errors_of(tmp_path, registry, "devices:\n  - size: 1G\n  - name: b\n")
    assert msgs == [
        f"{path}:2: devices[0]: missing required key 'name' (a unique device name, e.g. disk0)",
        f"{path}:2: devices[0]: missing required key 'handler' (known handlers: file, null, picky)",
        f"{path}:3: devices[1]: missing required key 'handler' (known handlers: file, null, picky)",
    ]


def test_invalid_device_name(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path, registry, 'devices:\n  - {name: "a b", handler: picky}\n  - {name: "..", handler: picky}\n'
    )
    assert msgs[0] == (
        f"{path}:2: devices[0].name: 'a b' is not a valid device name "
        "(expected 1-64 characters from A-Z a-z 0-9 _ . -, not '.' or '..')"
    )
    assert msgs[1].startswith(f"{path}:3: devices[1].name: '..' is not a valid device name")


def test_size_not_multiple_of_block_size(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            block_size: 4096
            size: 1000000
        """,
    )
    assert msg == ":5: devices[0].size: 1000000 is not a multiple of block_size 4096"
    msg = one_error(tmp_path, registry, 'devices:\n  - {name: a, handler: "null", block_size: 4K, size: 6K}\n')
    assert msg == ":2: devices[0].size: 6K (6144 bytes) is not a multiple of block_size 4096"


def test_physical_smaller_than_logical(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            block_size: 4096
            physical_block_size: 512
        """,
    )
    assert msg == ":6: devices[0].physical_block_size: 512 is smaller than block_size 4096 (expected physical_block_size >= block_size)"
    msg = one_error(tmp_path, registry, 'devices:\n  - {name: a, handler: "null", size: 1G, physical_block_size: 1536}\n')
    assert msg == ":2: devices[0].physical_block_size: 1536 is not a power of two (expected e.g. 4096)"


def test_duplicate_names(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - {name: disk, handler: "null", size: 1G}
          - {name: other, handler: "null", size: 1G}
          - {name: disk, handler: "null", size: 2G}
        """,
    )
    assert msg == ":4: devices[2].name: duplicate device name 'disk' (also used by devices[0])"


def test_duplicate_fixed_ids(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - {name: a, handler: "null", size: 1G, id: 3}
          - {name: b, handler: "null", size: 1G, id: -1}
          - {name: c, handler: "null", size: 1G, id: -1}
          - {name: d, handler: "null", size: 1G, id: 3}
        """,
    )
    assert msg == ":5: devices[3].id: duplicate device id 3 (also used by devices[0]; use -1 or omit it for automatic ids)"


def test_duplicate_yaml_key(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            size: 2G
        """,
    )
    assert msg == ":5: devices[0].size: duplicate key (first given at line 4)"


def test_missing_required_handler_option(tmp_path, registry):
    msg = one_error(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: file
            options:
              direct: true
        """,
    )
    assert msg == (
        ":5: devices[0].options: missing required option 'path' for handler 'file' (backing file or block device)"
    )
    # without any options mapping the error points at the device
    msg = one_error(tmp_path, registry, "devices:\n  - name: a\n    handler: file\n")
    assert msg.startswith(":2: devices[0].options: missing required option 'path'")


def test_handler_option_errors(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: file
            options:
              path: /x
              direct: 1
              cache: lots
              mode: wr
              dirct: true
        """,
    )
    assert msgs == [
        f"{path}:6: devices[0].options.direct: expected a boolean (true/false), got integer 1",
        f"{path}:7: devices[0].options.cache: 'lots' is not a size (expected a number with an optional K/M/G/T suffix, e.g. 512M)",
        f"{path}:8: devices[0].options.mode: 'wr' is not one of 'rw', 'ro'",
        f"{path}:9: devices[0].options.dirct: unknown option for handler 'file'; did you mean 'direct'?",
    ]


def test_options_not_a_mapping(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n  - name: a\n    handler: file\n    options: /x\n")
    assert msg == ":4: devices[0].options: expected a mapping of handler options, got '/x'"


def test_handler_check_config_error(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n  - name: a\n    handler: picky\n    options: {lo: 5, hi: 1}\n")
    assert msg == ":4: devices[0].options: lo (5) must not exceed hi (1)"


def test_size_required_by_handler(tmp_path, registry):
    msg = one_error(tmp_path, registry, 'devices:\n  - name: z\n    handler: "null"\n')
    assert msg == (
        ":2: devices[0]: missing required key 'size' "
        "(handler 'null' cannot tell the device size by itself; e.g. size: 1G)"
    )


def test_devices_not_a_list(tmp_path, registry):
    msg = one_error(tmp_path, registry, "devices:\n  name: a\n  handler: file\n")
    assert msg == ":2: devices: expected a list of devices (each item starting with '- name: ...'), got a mapping"


def test_global_section_errors(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        runner:
          log_level: verbose
          log_target: logs/runner.log
          state_dir: run/ublk
          metrics:
            prometheus_port: on
          plugins:
            autoload: 1
            block: rbd
        """,
    )
    assert msgs == [
        f"{path}:2: runner.log_level: 'verbose' is not a log level (expected one of: debug, info, warning, error)",
        f"{path}:3: runner.log_target: 'logs/runner.log' is not a log target (expected 'stderr', 'journald' or an absolute file path)",
        f"{path}:4: runner.state_dir: 'run/ublk' is not an absolute path (expected e.g. /run/ublk-runner)",
        f"{path}:6: runner.metrics.prometheus_port: expected an integer, got boolean true (YAML reads yes/no/on/off/true/false as booleans)",
        f"{path}:8: runner.plugins.autoload: expected a boolean (true/false), got integer 1",
        f"{path}:9: runner.plugins.block: expected a list of strings, got 'rbd'",
    ]


def test_many_errors_collected_in_line_order(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        runner:
          log_level: loud
        devices:
          - {name: a, handler: nope}
          - {name: a, handler: "null", size: 3X}
        """,
    )
    assert [m.split(":")[1] for m in msgs] == ["2", "4", "5", "5"]
    assert "duplicate device name 'a'" in msgs[2] and "'3X' is not a size" in msgs[3]
    err = ConfigError(msgs)
    assert str(err) == "\n".join(msgs)


def test_unreadable_file(tmp_path, registry):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "missing.yaml", registry)
    assert ei.value.messages == [f"{tmp_path / 'missing.yaml'}: cannot read the config file: No such file or directory"]


def test_not_utf8(tmp_path, registry):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"devices: []\n# \xff\xfe\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, registry)
    assert ei.value.messages == [f"{p}:2: the file is not valid UTF-8"]


def test_keys_are_literal_strings(tmp_path, registry):
    # 'on:' would be the boolean True under YAML 1.1; we keep it as the text.
    msg = one_error(tmp_path, registry, "on: 1\n")
    assert msg == ":1: on: unknown key (expected one of: devices, runner)"


def test_yaml_octal_and_base60_numbers_are_flagged(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: "null"
            size: 1G
            id: 010
            depth: 1:30
            queues: yes
        """,
    )
    assert msgs == [
        f"{path}:5: devices[0].id: '010' is read by YAML as an octal number (8); write 8 if that is what you mean, or quote it if you meant text",
        f"{path}:6: devices[0].depth: '1:30' is read by YAML as a base-60 number (90); write 90 if that is what you mean, or quote it if you meant text",
        f"{path}:7: devices[0].queues: expected an integer, got boolean true (YAML reads yes/no/on/off/true/false as booleans)",
    ]


def test_parse_problems_and_validation_errors_reported_together(tmp_path, registry):
    path, msgs = errors_of(
        tmp_path,
        registry,
        """
        devices:
          - name: a
            handler: file
            options: {path: /x, path: /y}
          - name: b
            handler: nope
        """,
    )
    assert msgs == [
        f"{path}:4: devices[0].options.path: duplicate key (first given at line 4)",
        f"{path}:6: devices[1].handler: unknown handler 'nope' (known handlers: file, null, picky)",
    ]


def test_load_global_ignores_device_problems(tmp_path):
    p = write(
        tmp_path,
        """
        runner:
          plugins: {autoload: false, block: [rbd]}
        devices:
          - {name: a, handler: not-loaded-yet, size: 1G, id: 010}
        """,
    )
    g = load_global(p)
    assert g.plugins.autoload is False and g.plugins.block == ("rbd",)
    with pytest.raises(ConfigError) as ei:
        load_global(write(tmp_path, "runner:\n  plugins: {autoload: 1}\n  log_level: 010\n", "g.yaml"))
    assert [m.split(": ", 1)[1] for m in ei.value.messages] == [
        "runner.plugins.autoload: expected a boolean (true/false), got integer 1",
        "runner.log_level: '010' is read by YAML as an octal number (8); write 8 if that is what you mean, or quote it if you meant text",
    ]


# ---------------------------------------------------------------------------
# digests


def _load(tmp_path, registry, text, name):
    return load_config(write(tmp_path, text, name), registry)


def test_device_digest_stable_and_sensitive(tmp_path, registry):
    a = _load(
        tmp_path, registry,
        """
        devices:
          - {name: x, handler: file, options: {path: /a}}
          - {name: y, handler: "null", size: 1G}
        """,
        "a.yaml",
    )
    # same devices, reordered, explicit defaults, different layout
    b = _load(
        tmp_path, registry,
        """
        # comment
        devices:
          - name: y
            handler: "null"
            size: 1024M
            queues: 1
          - name: x
            handler: file
            options: {path: /a, direct: false}
        """,
        "b.yaml",
    )
    c = _load(tmp_path, registry, "devices:\n  - {name: x, handler: file, options: {path: /b}}\n", "c.yaml")
    da = {d.name: device_digest(d) for d in a.devices}
    db = {d.name: device_digest(d) for d in b.devices}
    assert da == db
    assert device_digest(c.devices[0]) != da["x"]
    assert len(da["x"]) == 64 and da["x"] != da["y"]
    plan = reload_plan(a, c)
    assert (plan.add, plan.remove, plan.change, plan.keep) == ((), ("y",), ("x",), ())
    plan = reload_plan(a, b)
    assert (plan.add, plan.remove, plan.change, plan.keep) == ((), (), (), ("y", "x"))
    plan = reload_plan(Config(), b)
    assert plan.add == ("y", "x") and plan.keep == ()


# ---------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0), ("4096", 4096), ("512B", 512), ("4K", 4096), ("4k", 4096), ("512M", 512 << 20),
        ("10G", 10 << 30), ("1T", 1 << 40), ("2P", 2 << 50), ("64KiB", 64 << 10), ("1MiB", 1 << 20),
        ("3GiB", 3 << 30), ("1TiB", 1 << 40), (" 16 M ", 16 << 20), (4096, 4096),
    ],
)
def test_parse_size_good(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "M", "10X", "1.5G", "1e9", "10MB", "10 kb", "-1", "0x10", True, 1.0, None, [1]])
def test_parse_size_bad(bad):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=1 << 60))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


# ---------------------------------------------------------------------------
# robustness: whatever the input, the only failure is a ConfigError

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(["1G", "512", "auto", "null", "file", "yes", "4K", "-1", "x" * 70]),
)
_keys = st.sampled_from(
    ["runner", "devices", "name", "handler", "size", "id", "queues", "depth", "block_size",
     "physical_block_size", "max_io_size", "read_only", "recovery", "request_timeout", "isolate",
     "user_copy", "options", "path", "direct", "latency_us", "lo", "hi", "metrics", "plugins",
     "log_level", "log_target", "prometheus_port", "block", "autoload", "bogus"]
)
_trees = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(_keys, kids, max_size=6)),
    max_leaves=25,
)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(["runner", "devices", "bogus"]), _trees, max_size=3))
def test_random_structures_only_raise_config_error(tree, tmp_path_factory):
    import yaml

    reg = HandlerRegistry()
    for cls in (FileH, NullH, PickyH):
        reg.add(cls)
    p = tmp_path_factory.mktemp("fuzz") / "f.yaml"
    p.write_text(yaml.safe_dump(tree))
    try:
        cfg = load_config(p, reg)
    except ConfigError as e:
        assert e.messages and all(m.startswith(str(p)) for m in e.messages)
    else:
        for d in cfg.devices:
            assert len(device_digest(d)) == 64


_tokens = st.sampled_from(list("devices:- name{}[]\"'\t\n #&*!<>|1G") + ["runner:", "handler: file", "devices:\n  - ", "<<: *a", "&a "])


@FUZZ
@given(text=st.lists(_tokens, max_size=30).map("".join))
def test_random_text_only_raises_config_error(text, tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "t.yaml"
    p.write_text(text)
    try:
        load_config(p, None)
    except ConfigError as e:
        assert e.messages
