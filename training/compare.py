"""mtpf-compare: the comparison table of pre-finetuning modes over a suite of datasets.

For every (dataset x mode x seed) it runs task adaptation (:mod:`mtpf_training.adapt`) on a
pre-finetuned checkpoint and records the test metric:

* NER: LoRA fine-tuning + token head, initialised from the checkpoint's ``pf_ner``
  adapter when it has one (mode ``tpl``), else a fresh LoRA; seqeval entity micro F1.
* TC: linear probe on mean-pooled embeddings, with the checkpoint's ``pf_tc`` adapter
  active when it has one, else the plain backbone; accuracy.

Each run writes into its own child checkpoint (``OUT/runs/<mode>/<dataset>-s<seed>``) whose
``backbone/`` files are hard links (or symlinks) to the pre-finetuned one: the input
checkpoints are never modified. ``OUT/results.json`` gets every run as it finishes
(metrics, config, wall time) and ``OUT/table.md`` is rewritten from it, so an interrupted
comparison resumes where it stopped: a run whose (mode, dataset, seed, settings) is
already in results.json is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mtpf_training import NER_MIN_STEPS
from mtpf_training import checkpoint as ck
from mtpf_training.arch import parse_layers
from mtpf_training.data import Dataset

SCHEMA = "mtpf-compare/1"
MODE_ORDER = ("base", "ner", "tc", "naive", "tpl")  # the modes; others follow in given order
PF_NER, PF_TC = "pf_ner", "pf_tc"  # adapter names a tpl checkpoint carries

# docs/suite.md says why each dataset is in or out.
DEFAULT_NER = (
    "conll2003", "wnut17", "btc", "tweebank_ner", "bc5cdr", "ncbi_disease", "mit_movie_eng",
    "mit_movie_trivia", "crossner_politics", "crossner_science", "crossner_music",
    "crossner_literature", "crossner_ai",
)
DEFAULT_TC = (
    "sst2", "sst5", "mr", "cr", "subj", "mpqa", "trec", "ag_news", "emotion", "20newsgroups",
    "tweeteval_hate", "tweeteval_irony", "tweeteval_offensive",
)
SUITES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_NER + DEFAULT_TC,
    "quick": ("conll2003", "ncbi_disease", "sst2", "trec"),
}
LOW_RESOURCE_FRACTION = 0.1
SUBSET_SEED = 0  # caps and the low-resource cut are the same for every mode and seed: paired runs

log = logging.getLogger("mtpf.compare")


class CompareError(ValueError):
    """A comparison that cannot run as asked; the message says what would be right."""


# =========================================================================== settings and keys

@dataclass(frozen=True)
class Settings:
    """Everything besides mode, dataset and seed that changes a run's result."""

    max_train: int | None = None  # cap on training examples (seeded subset, same for all modes)
    max_test: int | None = None  # cap on test and on dev examples (seeded subset)
    epochs: int = 3  # NER epochs (the TC probe has no epochs)
    min_steps: int = NER_MIN_STEPS  # NER: at least this many optimizer steps (adapt.train_ner)
    low_resource: bool = False  # NER: 10% of the training set (seed 0) before max_train
    lr: float = 1e-3  # NER LoRA learning rate, as mtpf-adapt
    ner_batch_size: int = 32  # as mtpf-adapt; smaller gives more steps on capped training sets
    ner_max_length: int = 128
    tc_max_length: int = 256
    cache_lower_layers: bool = True  # frozen lower layers once, in eval mode (see adapt.py)
    # "fixed": every seed trains on the seed-0 subset (seeds vary NER init and order only; a TC
    # probe is then deterministic); "per-seed": seed s draws its own training subset (and
    # low-resource cut), so TC cells get a spread too. Test and dev subsets stay fixed.
    train_subsets: str = "fixed"
    # NER: the layers a fresh task LoRA goes on (as mtpf-adapt --lora-layers) for checkpoints
    # without pf_ner; a tpl checkpoint's tasks continue pf_ner on that adapter's own layers.
    ner_lora_layers: str = "2"

    def __post_init__(self) -> None:
        if self.train_subsets not in ("fixed", "per-seed"):
            raise CompareError(f"train_subsets {self.train_subsets!r}; choose fixed or per-seed")
        try:
            parse_layers(self.ner_lora_layers)
        except ValueError as e:
            raise CompareError(f"ner_lora_layers: {e}") from None

    def for_kind(self, kind: str) -> dict[str, Any]:
        """The settings a run of this kind depends on: TC runs ignore the NER-only ones."""
        d = asdict(self)
        if kind == "tc":
            for k in ("epochs", "min_steps", "low_resource", "lr", "ner_batch_size", "ner_max_length",
                      "cache_lower_layers", "ner_lora_layers"):
                d.pop(k)
        else:
            d.pop("tc_max_length")
        # Fields added later are left out of the key at the value that was their old behaviour,
        # so results made before they existed still resume.
        for k, old in (("train_subsets", "fixed"), ("min_steps", 0), ("ner_lora_layers", "2")):
            if d.get(k) == old:
                d.pop(k)
        return d


def run_key(mode: str, dataset: str, seed: int, settings: dict[str, Any]) -> str:
    return json.dumps([mode, dataset, seed, settings], sort_keys=True)


def run_dir(out: Path, mode: str, dataset: str, seed: int, key: str) -> Path:
    """A run's task checkpoint folder; the key's hash keeps runs of other settings in one --out apart."""
    return out / "runs" / mode / f"{dataset}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# =========================================================================== datasets

def resolve_suite(spec: str) -> list[str]:
    """``default``, ``quick`` or a comma-separated list of registered dataset names."""
    from mtpf_training.data import available_datasets

    names = list(SUITES[spec]) if spec in SUITES else [n.strip() for n in spec.split(",") if n.strip()]
    known = available_datasets()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise CompareError(f"unknown dataset(s) {unknown} in --suite {spec!r}; use "
                           f"{sorted(SUITES)} or names from {sorted(known)}")
    return list(dict.fromkeys(names))


def _cap(examples: tuple, n: int | None, seed: int = SUBSET_SEED) -> tuple:
    """A seeded subset of ``n`` examples in their original order (all when n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return tuple(examples[i] for i in keep)


def low_resource_train(examples: tuple, seed: int = SUBSET_SEED) -> tuple:
    """10% of a training set (at least one example); the same cut for every call with ``seed``."""
    return _cap(examples, max(1, round(LOW_RESOURCE_FRACTION * len(examples))), seed)


def prepare_dataset(ds: Dataset, settings: Settings, seed: int = SUBSET_SEED) -> Dataset:
    """Capped splits; ``seed`` draws the training subset when ``settings.train_subsets`` is per-seed."""
    draw = seed if settings.train_subsets == "per-seed" else SUBSET_SEED
    train = ds.train
    if settings.low_resource and ds.kind == "ner":
        train = low_resource_train(train, draw)
    # NER selects nothing on dev (fixed epochs), so its dev split is not evaluated; TC picks C on it.
    dev = _cap(ds.dev, settings.max_test) if ds.kind == "tc" else ()
    return replace(ds, train=_cap(train, settings.max_train, draw), dev=dev, test=_cap(ds.test, settings.max_test))


# =========================================================================== checkpoints

def parse_checkpoints(specs: Sequence[str]) -> dict[str, str]:
    """``MODE=DIR`` (a checkpoint) or ``MODE=BASE`` (``minilm`` or an HF model folder)."""
    out: dict[str, str] = {}
    for spec in specs:
        mode, sep, value = spec.partition("=")
        if not sep or not mode or not value:
            raise CompareError(f"--checkpoint {spec!r}: expected MODE=DIR, e.g. base=minilm or tpl=ckpt/tpl")
        ck.check_name(mode, "mode")
        if mode in out:
            raise CompareError(f"mode {mode!r} given twice")
        out[mode] = value
    if not out:
        raise CompareError("no --checkpoint given; e.g. --checkpoint base=minilm")
    return dict(sorted(out.items(), key=lambda kv: _mode_rank(kv[0], list(out))))


def _mode_rank(mode: str, given: list[str]) -> tuple[int, int]:
    return (MODE_ORDER.index(mode), 0) if mode in MODE_ORDER else (len(MODE_ORDER), given.index(mode))


def materialise(mode: str, value: str, out: Path) -> Path:
    """The checkpoint folder for a mode; a base model spec becomes a fresh checkpoint in OUT."""
    path = Path(value)
    if (path / "backbone").is_dir():  # an mtpf checkpoint (an HF model folder has no backbone/)
        ck.read_config(path)  # schema check
        return path
    return ck.init_checkpoint(out / "checkpoints" / mode, value)


def fingerprint(ckpt: Path) -> str:
    """Backbone sha256 plus the pre-finetuned adapters' sha256: what a run's result depends on."""
    h = hashlib.sha256(ck.read_config(ckpt)["backbone_sha256"].encode())
    for name in (PF_NER, PF_TC):
        f = ckpt / "adapters" / name / "adapter_model.safetensors"
        h.update(f"{name}:{ck.sha256_file(f) if f.is_file() else '-'}".encode())
    return h.hexdigest()


def child_checkpoint(parent: Path, child: Path) -> Path:
    """An empty checkpoint sharing ``parent``'s backbone files (hard links, else symlinks).

    Runs write their adapter, head and task files into the child only.
    """
    if child.exists():  # a run that was interrupted: start it over
        shutil.rmtree(child)
    (child / "backbone").mkdir(parents=True)
    for f in sorted((parent / "backbone").iterdir()):
        dst = child / "backbone" / f.name
        try:
            os.link(f, dst)
        except OSError:  # another filesystem, or links not allowed
            os.symlink(f.resolve(), dst)
    cfg = ck.read_config(parent)
    cfg = {**cfg, "tasks": {}, "parent_checkpoint": str(parent.resolve())}
    (child / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (child / "metrics.json").write_text("{}\n")
    return child


# =========================================================================== one run

def run_one(
    parent: Path, child: Path, ds: Dataset, seed: int, settings: Settings, device: str,
    feature_cache: Any, progress: bool,
) -> dict[str, Any]:
    """Adapt one task on a child of ``parent``; returns the run's record."""
    from mtpf_training import adapt

    child_checkpoint(parent, child)
    t0 = time.time()
    if ds.kind == "ner":
        pf = parent / "adapters" / PF_NER
        init = str(pf) if (pf / "adapter_config.json").is_file() else None
        metrics = adapt.train_ner(
            child, ds, ds.name, init_adapter=init, lora_layers=settings.ner_lora_layers,
            epochs=settings.epochs, min_steps=settings.min_steps, lr=settings.lr,
            batch_size=settings.ner_batch_size,
            max_length=settings.ner_max_length, seed=seed, device=device, progress=progress,
            cache_lower_layers=settings.cache_lower_layers, feature_cache=feature_cache)
        metric_name, value = "f1", metrics["test"]["f1"]
        used = {"init_adapter": PF_NER if init else None}
    else:
        pf = parent / "adapters" / PF_TC
        adapter = str(pf) if (pf / "adapter_config.json").is_file() else None
        metrics = adapt.train_tc(child, ds, ds.name, adapter=adapter, max_length=settings.tc_max_length,
                                 seed=seed, device=device, progress=progress, feature_cache=feature_cache)
        metric_name, value = "accuracy", metrics["test"]["accuracy"]
        used = {"adapter": PF_TC if adapter else None}
    seconds = time.time() - t0
    config = ck.read_config(child)["tasks"][ds.name]
    return {"kind": ds.kind, "metric": metric_name, "value": float(value), "seconds": round(seconds, 2),
            "train_examples": len(ds.train), "test_examples": len(ds.test), **used,
            "task_checkpoint": str(child), "metrics": metrics, "config": config}


# =========================================================================== results.json

def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"schema": SCHEMA, "checkpoints": {}, "runs": []}
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise CompareError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}; use another --out")
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


LOCK_NAME = ".mtpf-compare.lock"


@contextmanager
def _exclusive(out: Path):
    """Hold OUT for one process. Each run saves results.json from its own copy of it, so a second
    mtpf-compare on the same OUT would drop the first one's runs from the file."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: nothing to lock with
        yield
        return
    path = out / LOCK_NAME
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise CompareError(f"{out} is in use by another mtpf-compare (pid {holder}); wait for it to "
                               "finish or use another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_modes(data: dict[str, Any], modes: dict[str, Path]) -> None:
    """One results.json, one checkpoint per mode: refuse to mix two checkpoints' results."""
    for mode, ckpt in modes.items():
        fp = fingerprint(ckpt)
        seen = data["checkpoints"].get(mode)
        if seen is not None and seen["fingerprint"] != fp:
            raise CompareError(
                f"mode {mode!r}: results.json holds runs of checkpoint {seen['path']} "
                f"(fingerprint {seen['fingerprint'][:12]}…) but {ckpt} has {fp[:12]}…; "
                "use another --out, or another mode name for the new checkpoint")
        data["checkpoints"][mode] = {"path": str(ckpt), "fingerprint": fp}


def check_held_out(modes: dict[str, Path], datasets: Sequence[str]) -> None:
    """Refuse to score a checkpoint on a dataset whose labels its pre-finetuning trained on."""
    for mode, ckpt in modes.items():
        pre = ck.read_config(ckpt).get("pretrain") or {}
        used = set((pre.get("config") or {}).get("label_pair_sources") or ())
        clash = [d for d in datasets if d in used]
        if clash:
            raise CompareError(f"mode {mode!r}: checkpoint {ckpt} was pre-finetuned on the labels of {clash} "
                               "(label_pair_sources); its scores there would not be held out. Drop them from "
                               "--suite or pre-finetune without them")


# =========================================================================== the table

def _fmt(values: list[float], seeds: int) -> str:
    """Metric x100: mean, and ± sample std (ddof=1) when more than one seed."""
    if not values:
        return "–"
    mean = 100 * float(np.mean(values))
    if seeds > 1 and len(values) > 1:
        return f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"
    return f"{mean:.1f}"


def _delta(d: float | None, std: float | None = None) -> str:
    if d is None:
        return "–"
    return f"{d:+.1f}" + ("" if std is None else f" ± {std:.1f}")


def _std_of_seed_means(values: dict[str, dict[int, float]], seeds: Sequence[int],
                       scale: float = 1.0) -> float | None:
    """Sample std over the seeds that every dataset has of scale x (the datasets' mean value on
    that seed); None with fewer than two such seeds."""
    per_seed = [scale * float(np.mean([v[s] for v in values.values()])) for s in seeds
                if all(s in v for v in values.values())]
    return float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None


def summarise(
    runs: Sequence[dict[str, Any]], modes: Sequence[str], datasets: Sequence[str], seeds: Sequence[int],
    settings: Settings,
) -> dict[str, Any]:
    """Per-cell values, per-family averages and deltas against base, all x100.

    A family average is the mean over the family's datasets of each dataset's mean over
    seeds; its ± is the sample std over seeds of the per-seed family averages. A mode's
    average counts only datasets it has results for (``n`` says how many); its delta
    against base is taken over the datasets both have. A delta's std (``delta_std``,
    ``family_delta_std``) is over the seeds of the paired differences, mode minus base on the
    same seed (the same training subset with per-seed subsets): the spread of the gain, not of
    either score.
    """
    from mtpf_training.data import available_datasets

    kinds = available_datasets()
    by: dict[tuple[str, str], dict[int, float]] = {}
    kind_of: dict[str, str] = {}
    for r in runs:
        if (r["mode"] in modes and r["dataset"] in datasets and r["seed"] in seeds
                and r["settings"] == settings.for_kind(r["kind"])):
            by.setdefault((r["mode"], r["dataset"]), {})[r["seed"]] = r["value"]
            kind_of[r["dataset"]] = r["kind"]
    cells = {(m, d): [by.get((m, d), {})[s] for s in seeds if s in by.get((m, d), {})]
             for m in modes for d in datasets}
    mean = {k: 100 * float(np.mean(v)) for k, v in cells.items() if v}
    families: dict[str, list[str]] = {}
    for d in datasets:
        families.setdefault(kind_of.get(d, kinds.get(d, "?")), []).append(d)
    avg: dict[tuple[str, str], dict[str, Any]] = {}
    for fam, names in families.items():
        for m in modes:
            have = [d for d in names if (m, d) in mean]
            if not have:
                continue
            avg[(m, fam)] = {"mean": float(np.mean([mean[(m, d)] for d in have])), "n": len(have),
                             "of": len(names),
                             "std": _std_of_seed_means({d: by[(m, d)] for d in have}, seeds, scale=100)}
    delta: dict[tuple[str, str], float] = {}
    fam_delta: dict[tuple[str, str], float] = {}
    delta_std: dict[tuple[str, str], float] = {}
    fam_delta_std: dict[tuple[str, str], float] = {}
    if "base" in modes:
        for m in modes:
            if m == "base":
                continue
            paired: dict[str, dict[int, float]] = {}  # dataset -> seed -> (mode - base) x100
            for d in datasets:
                if (m, d) in mean and ("base", d) in mean:
                    delta[(m, d)] = mean[(m, d)] - mean[("base", d)]
                    mine, base = by[(m, d)], by[("base", d)]
                    paired[d] = {s: 100 * (mine[s] - base[s]) for s in seeds if s in mine and s in base}
                    std = _std_of_seed_means({d: paired[d]}, seeds)
                    if std is not None:
                        delta_std[(m, d)] = std
            for fam, names in families.items():
                both = [d for d in names if (m, d) in delta]
                if both:
                    fam_delta[(m, fam)] = float(np.mean([delta[(m, d)] for d in both]))
                    std = _std_of_seed_means({d: paired[d] for d in both}, seeds)
                    if std is not None:
                        fam_delta_std[(m, fam)] = std
    return {"cells": cells, "mean": mean, "families": families, "average": avg, "delta": delta,
            "delta_std": delta_std, "family_delta_std": fam_delta_std,
            "family_delta": fam_delta}


FAMILY_TITLE = {"ner": "NER (test F1 x100)", "tc": "TC (test accuracy x100)"}


def render_table(
    runs: Sequence[dict[str, Any]], modes: Sequence[str], datasets: Sequence[str], seeds: Sequence[int],
    settings: Settings,
) -> str:
    s = summarise(runs, modes, datasets, seeds, settings)
    sizes: dict[str, str] = {}
    secs: dict[str, float] = {}
    for r in runs:
        if r.get("dataset") in datasets and r.get("mode") in modes:
            sizes.setdefault(r["dataset"], f"{r['train_examples']}/{r['test_examples']}")
            secs[r["mode"]] = secs.get(r["mode"], 0.0) + r["seconds"]
    lines = [f"Settings: {json.dumps(asdict(settings))}; seeds {list(seeds)}"
             + ("; cells are mean ± sample std over seeds" if len(seeds) > 1 else ""), ""]
    head = "| dataset | train/test | " + " | ".join(modes) + " |"
    rule = "|---|---|" + "---|" * len(modes)
    for fam, names in s["families"].items():
        lines += [f"### {FAMILY_TITLE.get(fam, fam)}", "", head, rule]
        for d in names:
            cells = [_fmt(s["cells"][(m, d)], len(seeds)) for m in modes]
            lines.append(f"| {d} | {sizes.get(d, '–')} | " + " | ".join(cells) + " |")
        avg_cells = []
        for m in modes:
            a = s["average"].get((m, fam))
            if a is None:
                avg_cells.append("–")
                continue
            txt = f"{a['mean']:.1f}" + (f" ± {a['std']:.1f}" if a["std"] is not None else "")
            avg_cells.append(txt + ("" if a["n"] == a["of"] else f" ({a['n']}/{a['of']})"))
        lines += ["| **average** | | " + " | ".join(f"**{c}**" for c in avg_cells) + " |", ""]
    others = [m for m in modes if m != "base"]
    if "base" in modes and others:
        lines += ["### Δ vs base (points)", ""]
        if len(seeds) > 1:
            lines += ["± is the sample std over seeds of the paired differences (each seed's run against "
                      "base's run of the same seed).", ""]
        lines += ["| dataset | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for fam, names in s["families"].items():
            for d in names:
                lines.append(f"| {d} | " + " | ".join(_delta(s["delta"].get((m, d)), s["delta_std"].get((m, d)))
                                                      for m in others) + " |")
            lines.append(f"| **{fam} average** | " + " | ".join(
                f"**{_delta(s['family_delta'].get((m, fam)), s['family_delta_std'].get((m, fam)))}**"
                for m in others) + " |")
        lines.append("")
    if secs:
        lines.append("Run time (task adaptation, summed over runs): "
                     + ", ".join(f"{m} {secs[m] / 60:.1f} min" for m in modes if m in secs))
    return "\n".join(lines) + "\n"


# =========================================================================== the comparison

def compare(
    checkpoints: dict[str, str], datasets: Sequence[str], out: str | Path, *, seeds: Sequence[int] = (0,),
    settings: Settings = Settings(), device: str = "cpu", progress: bool = False,
    loader: Callable[[str], Dataset] | None = None, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every missing (dataset, mode, seed), then write results.json and table.md. One process
    at a time per ``out``: a second gets a CompareError while the first runs."""
    from mtpf_training.data import load_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _compare_locked(checkpoints, datasets, out, seeds, settings, device, progress, echo,
                               loader or load_dataset)


def _compare_locked(checkpoints: dict[str, str], datasets: Sequence[str], out: Path, seeds: Sequence[int],
                    settings: Settings, device: str, progress: bool, echo: Callable[[str], None],
                    loader: Callable[[str], Dataset]) -> dict[str, Any]:
    from mtpf_training.adapt import FeatureCache

    modes = {m: materialise(m, v, out) for m, v in checkpoints.items()}
    results_path = out / "results.json"
    data = load_results(results_path)
    check_modes(data, modes)
    check_held_out(modes, datasets)
    save_results(results_path, data)
    done = {r["key"] for r in data["runs"]}
    total = len(datasets) * len(modes) * len(seeds)
    i = 0
    for name in datasets:
        full = loader(name)
        if settings.train_subsets == "per-seed":
            per_seed = {seed: prepare_dataset(full, settings, seed) for seed in seeds}
        else:  # one subset for every seed: prepared once
            per_seed = dict.fromkeys(seeds, prepare_dataset(full, settings))
        for mode, ckpt in modes.items():
            cache = FeatureCache()  # one backbone and dataset: shared by the seeds (rows keyed by example)
            for seed in seeds:
                ds = per_seed[seed]
                i += 1
                key = run_key(mode, name, seed, settings.for_kind(ds.kind))
                if key in done:
                    echo(f"[{i}/{total}] {name} {mode} seed {seed}: done before, skipped")
                    continue
                rec = run_one(ckpt, run_dir(out, mode, name, seed, key), ds, seed, settings, device,
                              cache, progress)
                rec = {"key": key, "mode": mode, "dataset": name, "seed": seed,
                       "settings": settings.for_kind(ds.kind), **rec}
                data["runs"].append(rec)
                done.add(key)
                save_results(results_path, data)
                echo(f"[{i}/{total}] {name} {mode} seed {seed}: {rec['metric']} "
                     f"{100 * rec['value']:.2f} ({rec['seconds']:.1f} s)")
            del cache
    table = render_table(data["runs"], list(modes), datasets, seeds, settings)
    (out / "table.md").write_text(table)
    return data


# =========================================================================== CLI

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only (as mtpf-adapt): "(default: None)" tells a reader nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, []) or "default:" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpf-compare", formatter_class=_HelpFormatter,
        description="Task adaptation of several pre-finetuned checkpoints over a dataset suite; "
                    "writes OUT/results.json and OUT/table.md, resuming from results.json.")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODE=DIR",
                   help="a mode and its checkpoint folder, repeatable (base=minilm: a fresh checkpoint "
                        "of the plain base encoder, made in OUT/checkpoints/base)")
    p.add_argument("--suite", default="default",
                   help=f"{' | '.join(SUITES)} | a comma-separated list of registered datasets")
    p.add_argument("--out", required=True, help="output folder (results.json, table.md, runs/)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; more than one gives mean ± std")
    p.add_argument("--max-train", type=int, help="cap on training examples per dataset (seed-0 subset)")
    p.add_argument("--max-test", type=int, help="cap on test (and dev) examples per dataset (seed-0 subset)")
    p.add_argument("--epochs", type=int, default=3, help="NER LoRA epochs")
    p.add_argument("--min-steps", type=int, default=NER_MIN_STEPS,
                   help="NER: at least this many optimizer steps (more epochs on small training sets); "
                        "0 = exactly --epochs, the protocol of the tables before session 4")
    p.add_argument("--lr", type=float, default=1e-3, help="NER LoRA learning rate")
    p.add_argument("--ner-batch-size", type=int, default=32, help="NER training batch size")
    p.add_argument("--train-subsets", choices=("fixed", "per-seed"), default="fixed",
                   help="fixed: every seed trains on the seed-0 subset; per-seed: each seed draws its own "
                        "training subset (a real spread for the deterministic TC probe)")
    p.add_argument("--ner-lora-layers", default="2",
                   help="NER: layers of a fresh task LoRA (last k, 'all' or indices '0,3,5') for checkpoints "
                        "without pf_ner; tpl checkpoints continue pf_ner on its own layers")
    p.add_argument("--low-resource", action="store_true",
                   help="NER: 10%% of each training set (seed 0), before --max-train")
    p.add_argument("--no-cache-lower-layers", action="store_true",
                   help="run the whole encoder every NER step (frozen lower layers in train mode)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite table.md from results.json for these settings, run nothing")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    for flag in ("max_train", "max_test"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise CompareError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.epochs < 1 or args.lr <= 0 or args.ner_batch_size < 1 or args.min_steps < 0:
        raise CompareError("--epochs and --ner-batch-size must be >= 1, --lr > 0 and --min-steps >= 0")
    return Settings(max_train=args.max_train, max_test=args.max_test, epochs=args.epochs,
                    min_steps=args.min_steps,
                    low_resource=args.low_resource, lr=args.lr, ner_batch_size=args.ner_batch_size,
                    cache_lower_layers=not args.no_cache_lower_layers, train_subsets=args.train_subsets,
                    ner_lora_layers=args.ner_lora_layers.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        settings = _settings(args)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise CompareError("--seeds needs at least one seed")
        datasets = resolve_suite(args.suite)
        out = Path(args.out)
        if args.table_only:
            data = load_results(out / "results.json")
            given = list(parse_checkpoints(args.checkpoint)) if args.checkpoint else list(data["checkpoints"])
            modes = sorted(given, key=lambda m: _mode_rank(m, given))
            (out / "table.md").write_text(render_table(data["runs"], modes, datasets, seeds, settings))
        else:
            t0 = time.time()
            compare(parse_checkpoints(args.checkpoint), datasets, out, seeds=seeds, settings=settings,
                    device=args.device, progress=args.progress, echo=lambda m: print(m, flush=True))
            print(f"total wall time {time.time() - t0:.0f} s", flush=True)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        parser.exit(2, f"mtpf-compare: error: {msg}\n")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
