"""Plots of ``mtpf-compare`` results (matplotlib, from the bench extra).

    python -m mtpf_training.plots deltas runs/table/results.json [more results.json] --out deltas.png [--modes ner,tc,naive,tpl]
    python -m mtpf_training.plots scale runs/abl/results.json --out scale.png --points s1=1333,tpl=4000,s3=12000 [--seeds 0]

``deltas``: per dataset, each mode's metric minus base's (mean over seeds, x100), NER and TC
panels. ``scale``: family average against pre-finetuning data size, one point per mode
(``MODE=SIZE``; size is whatever the caller measured, e.g. raw sentences), base as a line, one
panel per task family that every point covers. Per task family, only runs with the settings
most runs of that family used are drawn; ``--seeds`` keeps only those seeds' runs (a curve whose
points have different seeds would mix seed noise into it). Several results.json files are read as
one table (e.g. an NER table and a TC table with per-seed subsets); a run that two files both hold,
or a mode that names two different checkpoints, is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _paths(results: Path | Sequence[Path]) -> list[Path]:
    """One results.json or several, as a list."""
    return [Path(results)] if isinstance(results, (str, Path)) else [Path(p) for p in results]


def _runs(paths: Path | Sequence[Path]) -> list[dict[str, Any]]:
    """The runs of one or several results.json files. ValueError when two files hold the same run,
    or name one mode after two different checkpoints (their fingerprints differ)."""
    runs: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    ckpt: dict[str, tuple[str, Path]] = {}  # mode -> (fingerprint, the file that first named it)
    for path in _paths(paths):
        data = json.loads(path.read_text())
        for mode, c in data.get("checkpoints", {}).items():
            fp, first = ckpt.setdefault(mode, (c["fingerprint"], path))
            if fp != c["fingerprint"]:
                raise ValueError(f"{path}: mode {mode!r} is checkpoint {c['path']} (fingerprint "
                                 f"{c['fingerprint'][:12]}…), but in {first} it is another one ({fp[:12]}…)")
        for r in data["runs"]:
            key = json.dumps([r["mode"], r["dataset"], r["seed"], r["settings"]], sort_keys=True)
            if key in seen:
                raise ValueError(f"{path}: run {r['mode']}/{r['dataset']} seed {r['seed']} is also in {seen[key]} "
                                 "with the same settings; pass each table once")
            seen[key] = path
            runs.append(r)
    return runs


def load_means(paths: Path | Sequence[Path], seeds: Sequence[int] | None = None
               ) -> tuple[dict[tuple[str, str], float], dict[str, str]]:
    """(mode, dataset) -> mean metric x100 over seeds (``seeds`` only, when given); dataset -> kind."""
    runs = [r for r in _runs(paths) if seeds is None or r["seed"] in seeds]
    settings: dict[str, Counter] = defaultdict(Counter)  # per kind: the settings most runs used
    for r in runs:
        settings[r["kind"]][json.dumps(r["settings"], sort_keys=True)] += 1
    chosen = {k: c.most_common(1)[0][0] for k, c in settings.items()}
    vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    kind: dict[str, str] = {}
    for r in runs:
        if json.dumps(r["settings"], sort_keys=True) == chosen[r["kind"]]:
            vals[(r["mode"], r["dataset"])].append(100 * r["value"])
            kind[r["dataset"]] = r["kind"]
    return {k: float(np.mean(v)) for k, v in vals.items()}, kind


def _names(results: Path | Sequence[Path]) -> str:
    return ", ".join(map(str, _paths(results)))


def plot_deltas(results: Path | Sequence[Path], out: Path, modes: Sequence[str]) -> list[str]:
    """One panel per task family that has base runs; returns the families drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, kind = load_means(results)
    titles = {"ner": "NER: test F1 − base", "tc": "TC: test accuracy − base"}
    fams = [f for f in titles if any(k == f and ("base", d) in mean for d, k in kind.items())]
    if not fams:
        raise ValueError(f"{_names(results)}: no base runs to draw deltas against")
    fig, axes = plt.subplots(1, len(fams), figsize=(7 * len(fams), 5), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        names = sorted(d for d, k in kind.items() if k == fam and ("base", d) in mean)
        x = np.arange(len(names))
        width = 0.8 / max(len(modes), 1)
        for i, m in enumerate(modes):
            ys = [mean.get((m, d), np.nan) - mean[("base", d)] for d in names]
            ax.bar(x + i * width - 0.4 + width / 2, ys, width, label=m)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set(title=titles[fam], ylabel="points")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fams


def plot_scale(results: Path | Sequence[Path], out: Path, points: dict[str, float], seeds: Sequence[int] | None = None) -> list[str]:
    """One panel per task family in which every point has runs on all its datasets; returns those."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, kind = load_means(results, seeds)

    def avg(mode: str, fam: str) -> float:
        names = [d for d, k in kind.items() if k == fam]
        have = [mean[(mode, d)] for d in names if (mode, d) in mean]
        return float(np.mean(have)) if names and len(have) == len(names) else np.nan

    titles = {"ner": "NER average F1", "tc": "TC average accuracy"}
    fams = [f for f in titles if all(np.isfinite(avg(m, f)) for m in points)]
    if not fams:
        raise ValueError(f"{_names(results)}: no task family has runs of every point ({', '.join(points)}) on all its datasets")
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        xs = sorted(points, key=points.get)
        ax.plot([points[m] for m in xs], [avg(m, fam) for m in xs], marker="o", label="tpl")
        for m in xs:
            ax.annotate(m, (points[m], avg(m, fam)), fontsize=8)
        if np.isfinite(avg("base", fam)):
            ax.axhline(avg("base", fam), color="gray", linestyle="--", label="base")
        ax.set_xscale("log")
        ax.set(title=titles[fam], xlabel="pre-finetuning data (raw sentences = pairs per source)", ylabel="x100")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fams


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtpf_training.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["deltas", "scale"])
    ap.add_argument("results", type=Path, nargs="+", help="mtpf-compare results.json files, read as one table")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--modes", default="ner,tc,naive,tpl", help="deltas: modes to draw against base")
    ap.add_argument("--points", default="", help="scale: MODE=SIZE,... (e.g. s1=1333,tpl=4000,s3=12000)")
    ap.add_argument("--seeds", default="", help="scale: only these seeds' runs, e.g. 0 (default: all)")
    args = ap.parse_args(argv)
    try:
        if args.what == "deltas":
            plot_deltas(args.results, args.out, [m for m in args.modes.split(",") if m])
        else:
            pts: dict[str, Any] = {}
            for item in filter(None, args.points.split(",")):
                mode, _, size = item.partition("=")
                pts[mode] = float(size)
            if not pts:
                ap.error("scale needs --points MODE=SIZE,...")
            try:
                seeds = [int(x) for x in args.seeds.split(",") if x] or None
            except ValueError:
                ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
            plot_scale(args.results, args.out, pts, seeds)
    except (OSError, KeyError, ValueError) as e:
        print(f"plots: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
