"""Plot benchmark results: IOPS of every target as a ratio to its run's reference peer.

    python3 bench/plot.py [RESULT.json ...] [-o docs/_generated/bench.svg]

Reads the files the bench scripts write with ``--json`` (default: every ``bench/results/*.json``)
and draws one panel per benchmark, a bar per target and workload.  Ratios, not IOPS, are on the
axis because the VM runs under TCG on a shared host: only ratios within one run mean anything
(absolute IOPS are printed next to each bar for scale).  The docs build calls :func:`render`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
COLOURS = {"randread": "#4878a8", "randwrite": "#d08a3c"}


def load(paths: list[str]) -> list[dict]:
    """The result documents, in a stable order (by bench name); each is checked enough that a
    malformed file is named instead of failing deep inside matplotlib."""
    docs = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for key in ("bench", "reference", "rows"):
            if key not in doc:
                raise ValueError(f"{path}: not a bench result (no {key!r}); written by an old bench script?")
        if doc["reference"] not in doc["rows"]:
            raise ValueError(f"{path}: the reference {doc['reference']!r} is not one of its rows")
        doc["_path"] = path
        docs.append(doc)
    return sorted(docs, key=lambda d: d["bench"])


def ratios(doc: dict) -> list[tuple[str, str, float, float]]:
    """(target, workload, ratio to the reference, IOPS) for every measured cell of one run."""
    ref = doc["rows"][doc["reference"]]
    out = []
    for target, cells in doc["rows"].items():
        for wl in COLOURS:
            if wl in cells and wl in ref and ref[wl]["iops"] > 0:
                out.append((target, wl, cells[wl]["iops"] / ref[wl]["iops"], cells[wl]["iops"]))
    return out


def render(paths: list[str], out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the same input gives the same SVG (ids come from this salt, not from a random one)
    matplotlib.rcParams["svg.hashsalt"] = "ublk-runner-bench"
    matplotlib.rcParams["svg.fonttype"] = "none"   # text stays text: smaller, searchable
    docs = load(paths)
    if not docs:
        raise ValueError("no bench results to plot")
    heights = [max(1, len(d["rows"])) * 0.6 + 1.1 for d in docs]
    fig, axes = plt.subplots(len(docs), 1, figsize=(9, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, doc in zip(axes[:, 0], docs):
        cells = ratios(doc)
        targets = list(doc["rows"])
        workloads = [wl for wl in COLOURS if any(c[1] == wl for c in cells)]
        bar = 0.8 / max(1, len(workloads))
        top = max([c[2] for c in cells] + [1.0])
        for i, wl in enumerate(workloads):
            for target, w, ratio, iops in cells:
                if w != wl:
                    continue
                y = targets.index(target) + (i - (len(workloads) - 1) / 2) * bar
                ax.barh(y, ratio, height=bar, color=COLOURS[wl],
                        label=wl if target == doc["reference"] else None)
                ax.text(ratio + top * 0.01, y, f"{ratio:.2f}  ({iops:,.0f} IOPS)", va="center", fontsize=7)
        ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")
        ax.set_yticks(range(len(targets)))
        ax.set_yticklabels([textwrap.fill(t, 36) for t in targets], fontsize=8)
        for label, target in zip(ax.get_yticklabels(), targets):
            if target.startswith("ublk-runner"):
                label.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.35)
        ax.set_title(textwrap.fill(f"{doc['bench']}: {doc.get('title', '')}", 60), fontsize=9, loc="left")
        ax.set_xlabel(f"IOPS / {doc['reference']} (same run, {doc.get('date', '')[:10]})", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(workloads), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, metadata={"Date": None})
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="result files (default: bench/results/*.json)")
    ap.add_argument("-o", "--output", default="bench.svg", help="image to write (.svg or .png)")
    args = ap.parse_args()
    paths = args.results or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    print(render(paths, args.output))


if __name__ == "__main__":
    main()
