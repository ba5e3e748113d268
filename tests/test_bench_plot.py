"""bench/plot.py: the docs' performance figure is drawn from bench result files."""
import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _plot():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(tmp_path, name, rows, reference):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"bench": name, "title": "4k QD64", "reference": reference,
                             "date": "2026-11-29T00:00:00+00:00", "rows": rows}))
    return str(p)


def test_ratios_are_taken_against_the_runs_reference(tmp_path):
    plot = _plot()
    path = _result(tmp_path, "file", {
        "kernel loop": {"randread": {"iops": 1000, "lat_us": 1}, "randwrite": {"iops": 500, "lat_us": 1}},
        "ublk-runner file": {"randread": {"iops": 800, "lat_us": 1}, "randwrite": {"iops": 750, "lat_us": 1}},
    }, "kernel loop")
    (doc,) = plot.load([path])
    assert sorted(plot.ratios(doc)) == [
        ("kernel loop", "randread", 1.0, 1000), ("kernel loop", "randwrite", 1.0, 500),
        ("ublk-runner file", "randread", 0.8, 800), ("ublk-runner file", "randwrite", 1.5, 750)]


def test_render_draws_every_target_and_is_reproducible(tmp_path):
    pytest.importorskip("matplotlib")
    plot = _plot()
    paths = [
        _result(tmp_path, "null", {"kernel null_blk": {"randread": {"iops": 900, "lat_us": 1}},
                                   "ublk-runner native null": {"randread": {"iops": 700, "lat_us": 1}}},
                "kernel null_blk"),
        _result(tmp_path, "qcow2", {"qemu-nbd over nbd": {"randread": {"iops": 200, "lat_us": 1}},
                                    "ublk-runner qcow2": {"randread": {"iops": 300, "lat_us": 1}}},
                "qemu-nbd over nbd"),
    ]
    out1, out2 = tmp_path / "a.svg", tmp_path / "b.svg"
    plot.render(paths, str(out1))
    plot.render(paths, str(out2))
    svg = out1.read_text()
    ET.fromstring(svg)  # well-formed
    for text in ("kernel null_blk", "ublk-runner native null", "qemu-nbd over nbd", "1.50", "0.78"):
        assert text in svg, text
    assert svg == out2.read_text()


def test_a_result_without_its_reference_is_named(tmp_path):
    plot = _plot()
    path = _result(tmp_path, "rbd", {"krbd": {"randread": {"iops": 1, "lat_us": 1}}}, "rbd-nbd")
    with pytest.raises(ValueError, match=r"rbd\.json: the reference 'rbd-nbd' is not one of its rows"):
        plot.load([path])
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"kernel loop": {}}))
    with pytest.raises(ValueError, match=r"old\.json: not a bench result \(no 'bench'\)"):
        plot.load([str(bad)])
