"""benchmarks/: the merged-model alternative computes the same function, and ``--quick`` works.

The benchmark is run for its structure only (exit 0, sane numbers, every section present):
speed is never asserted; timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("psutil")

from ckpt_factory import make_checkpoint  # noqa: E402
from mtpf_benchmarks.latency import median_ratio, round_ratios  # noqa: E402
from mtpf_benchmarks.merged import build_merged_bundle  # noqa: E402
from mtpf_export.bundle import export_bundle  # noqa: E402
from mtpf_runtime import Runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
# Two classifiers (switch cost between tasks of one kind) and one tagger; ner_a's max_length
# is below the quick run's 64-piece texts, so the "skipped: longer than max_length" path runs.
TASKS = {
    "tc_a": {"kind": "tc", "labels": ["neg", "pos"], "adapter": "tc_a", "layers": (0, 1), "rank": 8,
             "targets": ("query", "key", "ffn_in", "ffn_out"), "max_length": 128},
    "ner_a": {"kind": "ner", "labels": NER_LABELS, "adapter": "ner_a", "layers": (1,), "rank": 4,
              "max_length": 48},
    "tc_b": {"kind": "tc", "labels": ["x", "y", "z"], "adapter": "tc_b", "layers": (1,), "rank": 8,
             "max_length": 128},
}
TEXTS = ["Peter Blackburn met Angela Merkel in Berlin.", "short", "",
         "The quick brown fox jumps over the lazy dog near Paris, France!", "a " * 70]
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def setup(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(tiny_bert, root / "ckpt", tasks=TASKS)
    return {"root": root, "ckpt": ckpt, "bundle": export_bundle(ckpt, root / "bundle", **QUIET) and root / "bundle"}


@pytest.mark.parametrize("task", ["tc_a", "ner_a"])
def test_merged_model_is_the_same_function(setup: dict[str, Path], task: str) -> None:
    """fp32 merged backbone (W + s·B@A, no LoRA slots) == fp32 mtpf graph with the adapter fed."""
    root, ckpt = setup["root"], setup["ckpt"]
    fp32 = export_bundle(ckpt, root / "fp32", precision="fp32", **QUIET) and root / "fp32"
    merged = build_merged_bundle(ckpt, task, root / f"merged_{task}", precision="fp32")
    assert Runtime(merged).manifest.lora_slots == ()
    rt, mrt = Runtime(fp32), Runtime(merged)
    floor = copy.copy(rt)  # the same graph with no adapter fed: the merge must not be a no-op
    floor._adapters = dict.fromkeys(rt._adapters)
    if TASKS[task]["kind"] == "tc":
        a, b = rt.logits(TEXTS, task), mrt.logits(TEXTS, task)
        assert np.abs(a - b).max() <= 1e-4
        assert np.abs(floor.logits(TEXTS, task) - b).max() > 1e-3
    else:
        rows = [e.ids[:46] for e in rt._tok.encode_batch(TEXTS, add_special_tokens=False)]
        got, want = mrt.token_logits(rows, task), rt.token_logits(rows, task)
        for a, b in zip(want, got):
            assert a.shape == b.shape
            assert a.size == 0 or np.abs(a - b).max() <= 1e-4
        assert max(np.abs(a - b).max() for a, b in zip(floor.token_logits(rows, task), got) if a.size) > 1e-3


def test_round_ratios_pair_each_round_and_bound_the_median() -> None:
    """Load that changes between rounds hits both calls of a round alike, so the per-round ratio
    is exact under it; the 95% interval covers the true ratio about 95% of the time."""
    load = np.repeat([1.0, 3.0, 1.0, 3.0, 3.0], 10)
    a, b = 10.0 * load, 11.0 * load
    b[::10] *= 4  # one call in ten hit by a hiccup of its own
    got = round_ratios(a, b)
    assert got["ratio"] == pytest.approx(10 / 11)
    assert got["ratio_ci95"] == pytest.approx([10 / 11, 10 / 11])

    rng = np.random.default_rng(1)
    def draws(n: int) -> list[dict]:
        return [round_ratios(rng.lognormal(0, 0.1, n) * 1.05, rng.lognormal(0, 0.1, n), resamples=500)
                for _ in range(200)]
    short, long_ = draws(20), draws(300)
    for rs in (short, long_):
        assert all(r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1] for r in rs)
        cover = np.mean([r["ratio_ci95"][0] <= 1.05 <= r["ratio_ci95"][1] for r in rs])
        assert 0.85 <= cover <= 0.995, cover
    width = lambda rs: np.median([np.ptp(r["ratio_ci95"]) for r in rs])  # noqa: E731
    assert width(long_) < width(short) / 2.5  # ~sqrt(15) narrower with 15x the rounds


def test_median_ratio_of_processes_ignores_one_odd_process_and_bounds_the_ratio() -> None:
    """Memory targets: one RSS figure per fresh process. A process several MB off (seen in
    session 19) moves neither median; the interval covers the true ratio about 95% of the time."""
    mtpf = [70.5, 70.9, 71.0, 77.3, 70.7, 71.2, 70.6]  # 7 processes, as the full run has
    merged1 = [67.4, 66.7, 67.0, 67.2, 66.9, 67.1, 66.8]
    got = median_ratio(mtpf, merged1)
    assert got["ratio"] == pytest.approx(70.9 / 67.0)  # the medians: 77.3 moves neither
    lo, hi = got["ratio_ci95"]
    assert lo <= got["ratio"] <= hi and hi < 77.3 / 67.0
    assert median_ratio([70.0, 71.0], [67.0, 66.0])["ratio_ci95"] is None  # two processes: no interval

    rng = np.random.default_rng(1)
    def draws(n: int) -> list[dict]:
        return [median_ratio(rng.normal(75, 3, n) * 1.05, rng.normal(75, 3, n), resamples=500) for _ in range(200)]
    few, many = draws(7), draws(15)
    for rs in (few, many):
        assert all(r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1] for r in rs)
        cover = np.mean([r["ratio_ci95"][0] <= 1.05 <= r["ratio_ci95"][1] for r in rs])
        assert 0.85 <= cover <= 0.995, cover
    width = lambda rs: np.median([np.ptp(r["ratio_ci95"]) for r in rs])  # noqa: E731
    assert width(many) < width(few) / 1.2


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ~60 s alone on 2 cores (the --quick budget; three torch worker processes import torch).
@pytest.mark.slow
def test_quick_benchmark_runs_and_writes_sane_results(setup: dict[str, Path]) -> None:
    out = setup["root"] / "bench_out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "latency.py"), "--bundle", str(setup["bundle"]),
         "--checkpoint", str(setup["ckpt"]), "--out", str(out), "--quick"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("|") > 20
    assert res["machine"]["cores"] >= 1 and res["machine"]["onnxruntime"]

    lat = res["latency"]
    engines = {r["engine"] for r in lat}
    assert {"mtpf", "floor", "merged", "torch"} <= engines
    measured = [r for r in lat if not r.get("skipped")]
    assert measured and any(r.get("skipped") for r in lat)  # ner_a cannot take 64 pieces
    for r in measured:
        assert all(_finite_positive(r[k]) for k in ("p50_ms", "p95_ms", "p99_ms")), r
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
        assert r["n"] >= 1 and r["tokens"] == r["seq"]
    for w in res["workers"]:
        assert _finite_positive(w["rss_load_mb"]) and _finite_positive(w["peak_rss_mb"]), w
        assert _finite_positive(w["cold_start_ms"]), w
        if w["engine"] != "torch":
            assert not w["torch_imported"], w  # the ONNX engines never pull torch in

    mem = res["memory"]
    assert {(m["engine"], m["k"]) for m in mem} >= {("mtpf", 1), ("mtpf", 2), ("merged", 1), ("merged", 2),
                                                   ("floor", 0)}
    for m in mem:
        assert _finite_positive(m["rss_mb"]) and _finite_positive(m["peak_rss_mb"]), m
        runs = 1 if m["engine"] == "torch" else res["params"]["memory_repeats"]
        assert m["n"] == runs and len(m["samples"]["model_mb"]) == runs, m
        assert min(m["samples"]["model_mb"]) <= m["model_mb"] <= max(m["samples"]["model_mb"]), m
    for name in ("rss_k_over_merged1", "merged_k_over_mtpf"):  # 3 processes each in --quick: an interval
        lo, hi = res["ratios"][name]["ci95"]
        assert lo <= res["ratios"][name]["value"] <= hi, name
    assert res["disk"]["bundle_mb"] > 0

    assert set(res["spin"]) == {"off", "on"}
    for key, x in res["spin"].items():
        assert x["spin"] is (key == "on"), x  # the session really has the setting asked for
        for k in ("back_to_back_p50_ms", "analyze_p50_ms", "two_calls_p50_ms", "isolated_p50_ms", "isolated_cpu_ms"):
            assert _finite_positive(x[k]), (key, k, x)
    for name in ("spin_cpu", "spin_back_to_back"):
        assert _finite_positive(res["ratios"][name]["value"]), name
    assert "## Thread spinning" in (out / "results.md").read_text()
    for s in res["switch"]:
        assert _finite_positive(s["repeat_ms"]) and _finite_positive(s["alternate_ms"]), s
    for name in ("adapter_overhead", "rss_k_over_merged1", "merged_k_over_mtpf", "throughput_b32"):
        assert math.isfinite(res["ratios"][name]["value"]) and res["ratios"][name]["value"] > 0, name
    assert {t["target"] for t in res["targets"]} >= {"adapter_overhead", "rss_k_over_merged1",
                                                      "merged_k_over_mtpf", "throughput_b32"}
    assert all(t["status"] in ("PASS", "FAIL", "SKIP") for t in res["targets"])
    for t in res["targets"]:
        if t["target"] in ("adapter_overhead", "throughput_b32", "shared_trunk"):  # interleaved: an interval
            lo, hi = t["ci95"]
            assert lo <= t["value"] <= hi, t
            bound = float(t["bound"].split()[1])
            assert ("not resolved" in t.get("note", "")) == (lo <= bound <= hi), t
    for x in res["paired"]["throughput"]["tasks"].values():
        assert x["n"] == res["params"]["throughput_rounds"] and x["ratio_ci95"][0] <= x["ratio"], x
    if importlib.util.find_spec("matplotlib"):  # the bench extra installs it
        for png in ("latency_vs_seq.png", "memory_vs_tasks.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert not any("matplotlib" in n for n in res["notes"])
