"""Latency, memory and task-switch cost of an mtpf bundle, against what else one could ship.

    python benchmarks/latency.py --bundle DIR [--checkpoint CKPT] [--out runs/bench] [--quick]

Engines, each measured in the same run on the same texts:

* ``mtpf``:   the bundle through ``Runtime`` (one INT8 session, adapter chosen per call);
* ``floor``:  the same bundle and code with no adapter fed (nothing per-task can be cheaper);
* ``merged``: one merged INT8 model per task (``merged.py``), served by the same ``Runtime``
              code, one session per task: what a developer would otherwise ship;
* ``torch``:  PyTorch + PEFT, every adapter loaded, ``set_adapter`` per request (fp32).

The ratios the targets use are taken between calls interleaved in one process: the median of
the per-round ratios, with a 95% bootstrap interval that shows when a bound is inside the noise.

Every configuration runs in a fresh ``python -m mtpf_benchmarks.latency --worker SPEC``
process, so its RSS is its own; the parent collects one JSON line per worker and writes
``results.json``, ``results.md`` and (if matplotlib is importable) plots. ``merged`` and
``torch`` need the checkpoint the bundle was exported from (``--checkpoint``); without
``--bundle`` a demo checkpoint of the real MiniLM with random adapters is built and exported
(random adapters have the shapes, hence the cost, of trained ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MARK = "@@mtpf-bench "  # prefix of the worker's result line on stdout


@dataclass(frozen=True)
class Params:
    seqs: tuple[int, ...]
    batches: tuple[int, ...]
    threads: tuple[str, ...]  # "1" and/or "all"
    ks: tuple[int, ...]  # task counts for the memory curve
    min_n: int  # repetitions per latency cell: at least min_n, at most max_n,
    max_n: int  # and stop after budget_s once min_n are in
    budget_s: float
    paired_rounds: int  # adapter-overhead rounds (mtpf and floor interleaved)
    throughput_rounds: int
    switch_rounds: int
    torch_latency_kinds: tuple[str, ...]  # which task kinds torch's latency sweep covers
    worker_timeout_s: int
    isolated_rounds: int  # requests with a pause between them (thread spinning: CPU per request)
    memory_repeats: int  # fresh processes per (engine, K) of the memory curve (torch: one)


FULL = Params((16, 64, 128, 256), (1, 8), ("1", "all"), (1, 2, 4, 8), 10, 300, 1.5, 300, 60, 60,
              ("tc", "ner"), 1800, 60, 7)
# About a minute on 2 cores with a tiny model: every code path, few repetitions.
QUICK = Params((16, 64), (1,), ("1",), (1, 2), 3, 20, 0.15, 20, 3, 6, ("tc",), 300, 5, 3)
OVERHEAD_SEQ, THROUGHPUT_BATCH = 128, 32
PAUSE_S = 0.05  # between isolated requests: an app's requests do not come back to back
TARGETS = {  # name -> (comparison, bound, what it means)
    "adapter_overhead": ("<=", 1.05, "mtpf latency / floor, seq 128, batch 1, 1 thread"),
    "rss_k_over_merged1": ("<=", 1.15, "mtpf RSS with 8 tasks / one merged INT8 model"),
    "merged_k_over_mtpf": (">=", 3.0, "8 merged sessions RSS / mtpf RSS with 8 tasks"),
    "throughput_b32": (">=", 0.95, "mtpf throughput / floor, batch 32, all cores"),
    "shared_trunk": ("<=", 0.70, "analyze(tag + classify) / two separate calls, same text, batch 1, 1 thread"),
}
# Common English words; those the tokenizer keeps as one word piece build exact-length texts.
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there one all we their been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may "
         "then do first any my now such like our over man me even most made after also did many before "
         "must through back years where much your way well down should because each just those people "
         "how too little state good very make world still own see men work long get here between both "
         "life being under never day same another know while last might us great old year off come since "
         "against go came right used take three city house music water game team").split()


# ================================================================= measuring helpers
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def peak_rss_mb() -> float:
    """Peak RSS of this process. Linux keeps ``ru_maxrss`` across exec, so a worker would
    inherit its parent's peak; the kernel's VmHWM belongs to this process image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def n_threads(spec: str) -> int:
    return (os.cpu_count() or 1) if spec == "all" else int(spec)


def piece_texts(tok, length: int, n: int) -> list[str]:
    """``n`` different texts of exactly ``length`` word pieces (without [CLS]/[SEP])."""
    words = [w for w in WORDS if len(tok.encode(w, add_special_tokens=False).ids) == 1]
    if len(words) < 20:
        raise RuntimeError("the tokenizer splits almost every common English word; cannot build texts")
    texts = []
    for i in range(n):
        t = " ".join(words[(i * 7 + j * (1 + i % 5)) % len(words)] for j in range(length))
        got = len(tok.encode(t, add_special_tokens=False).ids)
        if got != length:
            raise RuntimeError(f"built a text of {got} word pieces instead of {length}")
        texts.append(t)
    return texts


def time_calls(fn, p: Params) -> list[float]:
    """Milliseconds per call: one warm-up, then min_n..max_n calls within budget_s."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + p.budget_s
    while len(times) < p.max_n and (len(times) < p.min_n or time.perf_counter() < end):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def interleaved_times(fa, fb, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds of ``fa`` and of ``fb`` per round, called alternately (order flipped every
    round) after one warm-up call each, so both see the same machine load."""
    fa(), fb()
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        for f, sink in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            t = time.perf_counter()
            f()
            sink.append((time.perf_counter() - t) * 1e3)
    return np.asarray(ta), np.asarray(tb)


def interleaved_p50(fa, fb, rounds: int) -> tuple[float, float]:
    ta, tb = interleaved_times(fa, fb, rounds)
    return float(np.median(ta)), float(np.median(tb))


def round_ratios(num: np.ndarray, den: np.ndarray, resamples: int = 2000) -> dict:
    """The median of the per-round ratios ``num[i] / den[i]`` and its 95% bootstrap interval.

    The two calls of a round ran back to back, so load that comes and goes over the run hits
    both sides of each ratio alike; the interval says whether a bound is within the noise."""
    r = num / den
    idx = np.random.default_rng(0).integers(0, len(r), (resamples, len(r)))
    lo, hi = np.percentile(np.median(r[idx], axis=1), [2.5, 97.5])
    return {"ratio": float(np.median(r)), "ratio_ci95": [float(lo), float(hi)],
            "ratio_of_medians": float(np.median(num) / np.median(den))}


def median_ratio(num: list[float], den: list[float], resamples: int = 2000) -> dict:
    """``median(num) / median(den)`` over independent samples (one fresh process each) and a 95%
    bootstrap interval that resamples each side on its own. With fewer than 3 samples on a
    side the interval is ``None``: a bootstrap of one or two processes says nothing."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    out = {"ratio": float(np.median(a) / np.median(b)), "ratio_ci95": None}
    if min(len(a), len(b)) >= 3:
        rng = np.random.default_rng(0)
        ra = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
        rb = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
        lo, hi = np.percentile(ra / rb, [2.5, 97.5])
        out["ratio_ci95"] = [float(lo), float(hi)]
    return out


def memory_summary(engine: str, k: int, runs: list[dict]) -> dict:
    """One (engine, K) row of the memory curve from its processes: the median of each figure,
    and every process's figures beside it."""
    keys = [key for key in runs[0] if isinstance(runs[0][key], (int, float)) and not isinstance(runs[0][key], bool)
            and all(key in r for r in runs)]
    row = {"engine": engine, "k": k, "n": len(runs), **{key: float(np.median([r[key] for r in runs])) for key in keys}}
    row["samples"] = {key: [r[key] for r in runs] for key in ("model_mb", "rss_mb", "model_mb_with_trunk_session")
                      if key in keys}
    return row


def pct(times: list[float]) -> dict:
    p50, p95, p99 = np.percentile(np.asarray(times), [50, 95, 99])
    return {"n": len(times), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(np.mean(times))}


# ================================================================= engines (worker side)
def _runtime_cls():
    from mtpf_runtime import Runtime

    return Runtime


def open_engine(spec: dict, threads: int, batch_size: int = 32):
    """The engine named in a worker spec, loaded with the spec's tasks."""
    engine = spec["engine"]
    Runtime = _runtime_cls()
    if engine == "mtpf":
        return Runtime(spec["bundle"], threads=threads, batch_size=batch_size, spin=spec.get("spin", False))
    if engine == "floor":  # the same Runtime and session, no adapter fed
        return Runtime(spec["bundle"], threads=threads, batch_size=batch_size).without_adapters()
    if engine == "merged":
        from .merged import MergedSet

        return MergedSet(spec["merged"], threads, batch_size)
    if engine == "torch":
        from .merged import torch_peft_class

        return torch_peft_class()(spec["bundle"], spec["checkpoint"], threads, spec["tasks"], batch_size)
    raise ValueError(f"unknown engine {engine!r}")


def call(eng, kind: str, texts: list[str], task: str):
    return eng.classify(texts, task) if kind == "tc" else eng.tag(texts, task)


# ================================================================= workers
def _tokenizer(bundle: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(bundle) / "tokenizer.json"))


def _fits(max_length: int, seq: int) -> bool:
    return seq + 2 <= max_length  # [CLS] + seq pieces + [SEP], nothing cut or windowed


def worker_latency(spec: dict, p: Params) -> dict:
    task, kind, threads = spec["task"], spec["kind"], n_threads(spec["threads"])
    tok = _tokenizer(spec["bundle"])
    base = rss_mb()
    t0 = time.perf_counter()
    eng = open_engine(spec, threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_load = rss_mb()
    call(eng, kind, piece_texts(tok, 16, 1), task)
    cold_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for seq in p.seqs:
        for batch in p.batches:
            row = {"engine": spec["engine"], "threads": spec["threads"], "task": task, "kind": kind,
                   "seq": seq, "batch": batch}
            if not _fits(spec["max_length"], seq):
                rows.append({**row, "skipped": f"task max_length {spec['max_length']} < {seq} pieces + 2"})
                continue
            texts = piece_texts(tok, seq, batch)
            tokens = len(tok.encode(texts[0], add_special_tokens=False).ids)
            stats = pct(time_calls(lambda: call(eng, kind, texts, task), p))
            rows.append({**row, "tokens": tokens, **stats, "per_text_ms": stats["p50_ms"] / batch})
    return {"load_ms": load_ms, "cold_start_ms": cold_ms, "rss_base_mb": base, "rss_load_mb": rss_load,
            "rss_end_mb": rss_mb(), "rows": rows}


def worker_memory(spec: dict, p: Params) -> dict:  # noqa: ARG001
    tok = _tokenizer(spec["bundle"])
    base = rss_mb()
    eng = open_engine(spec, n_threads(spec["threads"]))
    rss_load = rss_mb()
    # Steady state: every task's request twice. With a memory pattern, ONNX Runtime plans an
    # arena block from its first run of a shape and allocates it on the second, so one request
    # would leave an engine looking ~6 MB smaller than it runs. Runtime turns the pattern off;
    # the second request still catches whatever an engine allocates late.
    for _ in range(2):
        for task, kind, max_len in spec["calls"]:
            seq = OVERHEAD_SEQ if _fits(max_len, OVERHEAD_SEQ) else max_len - 2
            call(eng, kind, piece_texts(tok, seq, 1), task)
    rss = rss_mb()
    out = {"rss_base_mb": base, "rss_load_mb": rss_load, "rss_mb": rss, "model_mb": rss - base}
    kinds = {kind: task for task, kind, _ in spec["calls"]}
    if spec["engine"] == "mtpf" and len(kinds) == 2 and eng.shares_trunk:
        # what a multi-task call adds: the top.onnx session, made on first use
        text = piece_texts(tok, 64, 1)[0]
        for _ in range(2):
            eng.analyze(text, [kinds["ner"], kinds["tc"]])
        out["model_mb_with_trunk_session"] = rss_mb() - base
    return out


def worker_switch(spec: dict, p: Params) -> dict:
    """Alternating tasks A,B,A,B against repeating A,A,… and B,B,… on the same texts."""
    tok = _tokenizer(spec["bundle"])
    eng = open_engine(spec, 1)
    (ta, ka), (tb, kb) = spec["pair"]
    texts = piece_texts(tok, spec["seq"], 1)
    fa, fb = (lambda: call(eng, ka, texts, ta)), (lambda: call(eng, kb, texts, tb))
    rep_a, rep_b, alt = [], [], []
    fa(), fb()
    for _ in range(p.switch_rounds):  # blocks interleaved, so drift hits all three alike
        for fns, sink in (((fa, fa, fa, fa), rep_a), ((fb, fb, fb, fb), rep_b), ((fa, fb, fa, fb), alt)):
            for f in fns:
                t = time.perf_counter()
                f()
                sink.append((time.perf_counter() - t) * 1e3)
    repeat = (float(np.median(rep_a)) + float(np.median(rep_b))) / 2
    alternate = float(np.median(alt))
    return {"pair": [ta, tb], "seq": spec["seq"], "threads": "1", "repeat_ms": repeat, "alternate_ms": alternate,
            "switch_cost_ms": alternate - repeat, "n": len(alt)}


def worker_paired(spec: dict, p: Params) -> dict:
    """mtpf against the floor in one session, calls interleaved (the fairest ratio on a noisy box).

    ``overhead``: batch 1, one thread, per-request latency; ``throughput``: batch 32, all cores.
    """
    mode = spec["mode"]
    threads = 1 if mode == "overhead" else n_threads("all")
    batch = 1 if mode == "overhead" else THROUGHPUT_BATCH
    rounds = p.paired_rounds if mode == "overhead" else p.throughput_rounds
    tok = _tokenizer(spec["bundle"])
    rt = open_engine({**spec, "engine": "mtpf"}, threads, batch_size=batch)
    floor = rt.without_adapters()  # shares the session, tokenizer and heads; only the adapter differs
    out = {}
    for task, kind, max_len in spec["calls"]:
        seq = OVERHEAD_SEQ if _fits(max_len, OVERHEAD_SEQ) else max_len - 2
        texts = piece_texts(tok, seq, batch)
        fm, ff = (lambda: call(rt, kind, texts, task)), (lambda: call(floor, kind, texts, task))
        tm, tf = interleaved_times(fm, ff, rounds)
        mm, mf = float(np.median(tm)), float(np.median(tf))
        out[task] = {"kind": kind, "seq": seq, "batch": batch, "threads": threads, "n": rounds,
                     "mtpf_p50_ms": mm, "floor_p50_ms": mf,
                     # throughput: floor ms / mtpf ms, so higher is better, as for texts/s
                     **(round_ratios(tm, tf) if mode == "overhead" else round_ratios(tf, tm)),
                     "mtpf_texts_per_s": batch * 1e3 / mm, "floor_texts_per_s": batch * 1e3 / mf}
    return {"mode": mode, "tasks": out}


def worker_multitask(spec: dict, p: Params) -> dict:
    """Shared trunk and mixed batches, interleaved in one session.

    ``analyze``: tag + classify of one text (seq 64, batch 1, 1 thread) through
    ``Runtime.analyze`` against the two separate calls. ``mixed``: 32 rows alternating the
    two tasks through ``run_mixed`` against the caller grouping them by task (all cores).
    """
    tok = _tokenizer(spec["bundle"])
    (tn, _), (tc, _) = spec["pair"]  # (ner task, tc task)
    out = {}
    for mode, threads in (("analyze", 1), ("mixed", n_threads("all"))):
        rt = open_engine({**spec, "engine": "mtpf"}, threads, batch_size=THROUGHPUT_BATCH)
        if mode == "analyze":
            text = piece_texts(tok, 64, 1)[0]
            fa = lambda: rt.analyze(text, [tn, tc])  # noqa: E731
            fb = lambda: (rt.tag(text, task=tn), rt.classify(text, task=tc))  # noqa: E731
        else:
            texts = piece_texts(tok, 64, THROUGHPUT_BATCH)
            reqs = [(t, tn if i % 2 == 0 else tc) for i, t in enumerate(texts)]
            fa = lambda: rt.run_mixed(reqs)  # noqa: E731
            fb = lambda: (rt.tag([t for t, k in reqs if k == tn], task=tn),  # noqa: E731
                          rt.classify([t for t, k in reqs if k == tc], task=tc))
        rounds = p.paired_rounds if mode == "analyze" else p.throughput_rounds
        ta, tb = interleaved_times(fa, fb, rounds)
        out[mode] = {"threads": threads, "n": rounds, "combined_p50_ms": float(np.median(ta)),
                     "separate_p50_ms": float(np.median(tb)), **round_ratios(ta, tb), "shared_trunk": rt.shares_trunk}
    return out


def worker_spin(spec: dict, p: Params) -> dict:
    """One ``Runtime(spin=...)`` on all cores, seq 64, batch 1: what spinning buys and costs.

    Back to back: ``tag`` p50, and ``analyze`` against the two calls, interleaved. Isolated:
    ``tag`` with a ``PAUSE_S`` sleep after each call, and the process's CPU time per request
    over call and pause together: the spinning threads' work while the app waits.
    """
    tok = _tokenizer(spec["bundle"])
    (tn, _), (tc, _) = spec["pair"]
    threads = n_threads("all")
    rt = open_engine({**spec, "engine": "mtpf"}, threads, batch_size=1)
    text = piece_texts(tok, 64, 1)[0]
    ft = lambda: rt.tag(text, task=tn)  # noqa: E731
    back_to_back = float(np.median(time_calls(ft, p)))
    ma, mb = interleaved_p50(lambda: rt.analyze(text, [tn, tc]),
                             lambda: (rt.tag(text, task=tn), rt.classify(text, task=tc)), p.paired_rounds)
    walls = []
    time.sleep(PAUSE_S)
    c0 = time.process_time()  # every thread of the process: ONNX Runtime's workers too
    for _ in range(p.isolated_rounds):
        t = time.perf_counter()
        ft()
        walls.append((time.perf_counter() - t) * 1e3)
        time.sleep(PAUSE_S)
    cpu_ms = (time.process_time() - c0) * 1e3 / p.isolated_rounds
    return {"spin": rt.spin, "threads": threads, "seq": 64, "task": tn, "back_to_back_p50_ms": back_to_back,
            "analyze_p50_ms": ma, "two_calls_p50_ms": mb, "analyze_ratio": ma / mb,
            "isolated_p50_ms": float(np.median(walls)), "isolated_cpu_ms": cpu_ms, "pause_ms": PAUSE_S * 1e3,
            "n_isolated": p.isolated_rounds}


WORKERS = {"latency": worker_latency, "memory": worker_memory, "switch": worker_switch, "paired": worker_paired,
           "multitask": worker_multitask, "spin": worker_spin}


def run_worker(spec: dict) -> dict:
    p = QUICK if spec.get("quick") else FULL
    t0 = time.perf_counter()
    if spec["engine"] == "torch":
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    import mtpf_runtime  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401
    import_s = time.perf_counter() - t0
    res = WORKERS[spec["kind_of_run"]](spec, p)
    return {"worker": spec["kind_of_run"], "engine": spec["engine"], "import_s": import_s,
            "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules, **res}


# ================================================================= setup (parent side)
def _log(msg: str) -> None:
    print(msg, flush=True)


def _cached(out: Path, key: dict, build) -> Path:
    """Build ``out`` unless a previous run left it with the same key (stamp beside it)."""
    stamp = out.with_name(out.name + ".key.json")
    if out.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        return out
    build()
    stamp.write_text(json.dumps(key, sort_keys=True))
    return out


def demo_setup(work: Path, quick: bool) -> tuple[Path, Path]:
    from mtpf_export.bundle import export_bundle
    from mtpf_training.checkpoint import resolve_base_model

    from .merged import demo_tasks, make_demo_checkpoint

    base = resolve_base_model("minilm")
    tasks = demo_tasks(1, 2) if quick else demo_tasks(4, 4)
    ckpt, bundle = work / "demo_ckpt", work / "demo_bundle"
    key = {"base": str(base), "tasks": sorted(tasks)}
    _log(f"== no --bundle: demo checkpoint of {base.name} with {len(tasks)} random adapters -> {ckpt}")
    _cached(ckpt, key, lambda: make_demo_checkpoint(base, ckpt, tasks))
    _cached(bundle, key, lambda: export_bundle(ckpt, bundle, log=lambda *a: None))
    return bundle, ckpt


def plan_tasks(manifest) -> dict:
    tasks = manifest.tasks
    tcs = sorted(n for n, t in tasks.items() if t.kind == "tc")
    ners = sorted(n for n, t in tasks.items() if t.kind == "ner")
    chosen = [x for x in (tcs[:1] + ners[:1])]
    order = chosen + sorted(set(tasks) - set(chosen))
    # Switching between two tasks of one kind isolates the adapter change from head/decode work.
    pair = (tcs[:2] if len(tcs) >= 2 else ners[:2] if len(ners) >= 2 else order[:2])
    return {"tc": tcs[0] if tcs else None, "ner": ners[0] if ners else None, "order": order, "pair": pair}


def machine_facts() -> dict:
    import importlib.metadata as md

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "amx_int8")
    vers = {}
    for dist in ("onnxruntime", "torch", "transformers", "peft", "numpy", "mtpf"):
        try:
            vers[dist] = md.version(dist)
        except md.PackageNotFoundError:
            vers[dist] = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count() or 1,
            "physical_cores": physical, "threads_all": n_threads("all"), "python": platform.python_version(),
            "os": platform.platform(), "onnxruntime": vers["onnxruntime"], "versions": vers,
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _task_key(ckpt: Path, task: str) -> list[str]:
    """What a cached artifact of ``task`` was built from: its meta, head and adapter files."""
    from mtpf_runtime.manifest import sha256_file

    meta = ckpt / "tasks" / f"{task}.json"
    files = [meta, ckpt / "heads" / f"{task}.safetensors"]
    adapter = json.loads(meta.read_text()).get("adapter")
    if adapter:
        files.append(ckpt / "adapters" / adapter / "adapter_model.safetensors")
    return [sha256_file(f) for f in files]


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


# ================================================================= report
def _f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _ci(ci: list[float] | None) -> str:
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else ""


def _span(xs: list[float] | None) -> str:
    return f"{min(xs):.1f}–{max(xs):.1f}" if xs else ""


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict) -> str:
    mach = res["machine"]
    la0, la1 = mach.get("loadavg_start") or [None], mach.get("loadavg_end") or [None]
    out = ["# mtpf benchmark" + (" (--quick)" if res["quick"] else ""), "",
           f"- machine: {mach['cpu']}, {mach['cores']} logical cores ({mach['physical_cores']} physical), "
           f"flags {' '.join(mach['flags']) or 'none of avx/avx2/avx512/vnni'}; {mach['os']}",
           f"- onnxruntime {mach['onnxruntime']}, torch {mach['versions'].get('torch')}, python {mach['python']}; "
           f"threads: 1 and all = {mach['threads_all']}; load average {_f(la0[0], 2)} at start, "
           f"{_f(la1[0], 2)} at end",
           f"- bundle `{res['bundle']}`; tasks {res['tasks']['order']}; {res['elapsed_s']:.0f} s in all", "",
           "## Targets", ""]
    out += _table(["target", "measured", "95% interval", "bound", "status", "what"],
                  [[t["target"], _f(t["value"], 3), _ci(t.get("ci95")), t["bound"], f"**{t['status']}**",
                    t["what"] + (f" ({t['note']})" if t.get("note") else "")] for t in res["targets"]])
    extra = res["ratios"].get("rss_per_extra_task_mb")
    if extra:
        out += ["", f"Each further task adds {_f(extra['value'], 2)} MB of RSS to mtpf."]
    wt = res["ratios"].get("rss_k_over_merged1", {}).get("with_trunk_session")
    if wt is not None and math.isfinite(wt):
        out += ["", f"After a multi-task call (`analyze`, which loads `top.onnx` on first use) the RSS ratio "
                    f"to one merged model is {_f(wt, 3)}."]
    for key, title in (("overhead", "Adapter overhead (mtpf and floor interleaved in one session)"),
                       ("throughput", "Batch-32 throughput (mtpf and floor interleaved in one session)")):
        tasks = res["paired"].get(key, {}).get("tasks", {})
        if tasks:
            out += ["", f"## {title}", ""]
            out += _table(["task", "kind", "seq", "batch", "threads", "rounds", "mtpf p50 ms", "floor p50 ms",
                           "mtpf texts/s", "floor texts/s", "ratio of medians", "ratio", "95% interval"],
                          [[n, x["kind"], str(x["seq"]), str(x["batch"]), str(x["threads"]), str(x["n"]),
                            _f(x["mtpf_p50_ms"], 2), _f(x["floor_p50_ms"], 2), _f(x["mtpf_texts_per_s"]),
                            _f(x["floor_texts_per_s"]), _f(x.get("ratio_of_medians"), 3), _f(x["ratio"], 3),
                            _ci(x.get("ratio_ci95"))] for n, x in tasks.items()])
    out += ["", "## Latency per request, ms (p50 / p95 / p99; other engines p50)", ""]
    cells: dict[tuple, dict] = {}
    for r in res["latency"]:
        cells.setdefault((r["kind"], r["seq"], r["batch"], r["threads"]), {})[r["engine"]] = r
    rows = []
    for (kind, seq, batch, th), by in sorted(cells.items(), key=lambda kv: (kv[0][0] != "tc", kv[0][3], kv[0][2], kv[0][1])):
        mt = by.get("mtpf", {})
        if mt.get("skipped"):
            rows.append([kind, str(seq), str(batch), th, "skipped: " + mt["skipped"], "", "", "", "", ""])
            continue
        p50 = lambda e: _f(by.get(e, {}).get("p50_ms"), 2)  # noqa: E731
        rows.append([kind, str(seq), str(batch), th,
                     f"{_f(mt.get('p50_ms'), 2)} / {_f(mt.get('p95_ms'), 2)} / {_f(mt.get('p99_ms'), 2)}",
                     str(mt.get("n", "")), p50("floor"), p50("merged"), p50("torch"),
                     _f(ratio(mt.get("p50_ms"), by.get("floor", {}).get("p50_ms")), 3)])
    out += _table(["kind", "seq", "batch", "threads", "mtpf p50 / p95 / p99", "n", "floor", "merged INT8",
                   "torch+PEFT fp32", "mtpf/floor"], rows)
    out += ["", "## Load and cold start (fresh process; cold start = constructor to first result)", ""]
    out += _table(["engine", "threads", "task", "imports s", "load ms", "cold start ms", "RSS after load MB",
                   "peak RSS MB"],
                  [[w["engine"], w["threads"], w["task"], _f(w["import_s"], 2), _f(w["load_ms"], 0),
                    _f(w["cold_start_ms"], 0), _f(w["rss_load_mb"]), _f(w["peak_rss_mb"])] for w in res["workers"]])
    out += ["", "## Memory against number of tasks (medians over fresh processes; each task's request served "
                "twice)", ""]
    out += _table(["engine", "tasks K", "processes", "process RSS MB", "RSS above imports MB",
                   "above imports, min–max", "peak RSS MB", "above imports after an analyze() MB"],
                  [[x["engine"], str(x["k"]), str(x.get("n", 1)), _f(x["rss_mb"]), _f(x["model_mb"]),
                    _span(x.get("samples", {}).get("model_mb")), _f(x["peak_rss_mb"]),
                    _f(x.get("model_mb_with_trunk_session"))]
                   for x in sorted(res["memory"], key=lambda x: (x["engine"], x["k"]))])
    d = res["disk"]
    out += ["", "## On disk", "",
            f"- bundle {_f(d['bundle_mb'], 2)} MB (backbone {_f(d['backbone_mb'], 2)} MB); per task (adapter + "
            f"head): " + ", ".join(f"{n} {_f(v, 0)} KB" for n, v in sorted(d["per_task_kb"].items()))]
    if d["merged_mb"]:
        out += ["- merged models: " + ", ".join(f"{n} {_f(v, 2)} MB" for n, v in sorted(d["merged_mb"].items()))]
    if res.get("multitask"):
        out += ["", "## Several tasks per text, mixed-task batches (interleaved in one session)", ""]
        out += _table(["measurement", "threads", "rounds", "combined p50 ms", "separate p50 ms", "ratio",
                       "95% interval"],
                      [[name, str(x["threads"]), str(x["n"]), _f(x["combined_p50_ms"], 2),
                        _f(x["separate_p50_ms"], 2), _f(x["ratio"], 3), _ci(x.get("ratio_ci95"))]
                       for name, x in res["multitask"].items()
                       if isinstance(x, dict) and "ratio" in x])
    if res.get("spin"):
        out += ["", "## Thread spinning (Runtime spin=..., all cores, seq 64, batch 1; each setting in its own "
                    "process)", "",
                "ONNX Runtime's worker threads spin after a run unless told not to; `Runtime` turns that off "
                "unless `spin=True`. Isolated requests sleep "
                f"{_f(next(iter(res['spin'].values()))['pause_ms'], 0)} ms after each call; their CPU time counts "
                "every thread of the process over call and pause.", ""]
        out += _table(["spin", "tag p50 ms, back to back", "analyze / two calls", "tag p50 ms, isolated",
                       "CPU ms per isolated request"],
                      [[str(x["spin"]), _f(x["back_to_back_p50_ms"], 2),
                        f"{_f(x['analyze_p50_ms'], 2)} / {_f(x['two_calls_p50_ms'], 2)} = {_f(x['analyze_ratio'], 3)}",
                        _f(x["isolated_p50_ms"], 2), _f(x["isolated_cpu_ms"], 2)]
                       for x in res["spin"].values()])
        rc, rb = res["ratios"]["spin_cpu"]["value"], res["ratios"]["spin_back_to_back"]["value"]
        out += ["", f"spin=True / spin=False: CPU per isolated request {_f(rc, 2)}×, back-to-back tag p50 "
                    f"{_f(rb, 2)}×."]
    if res["switch"]:
        out += ["", "## Task switching (batch 1, 1 thread; blocks A A A A / B B B B / A B A B interleaved)", ""]
        out += _table(["engine", "pair", "seq", "repeat ms", "alternate ms", "switch cost ms"],
                      [[s["engine"], " ↔ ".join(s["pair"]), str(s["seq"]), _f(s["repeat_ms"], 3),
                        _f(s["alternate_ms"], 3), _f(s["switch_cost_ms"], 3)] for s in res["switch"]])
    if res["notes"] or res["errors"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]] + [f"- ERROR {e}" for e in res["errors"]]
    return "\n".join(out) + "\n"


def plots(res: dict, out: Path) -> list[str]:
    """latency_vs_seq.png and memory_vs_tasks.png; a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: no plots (results.json holds every number)"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("tc", "ner")):
        for eng in ("mtpf", "floor", "merged", "torch"):
            pts = sorted((r["seq"], r["p50_ms"]) for r in res["latency"] if r["engine"] == eng and r["kind"] == kind
                         and r["batch"] == 1 and r["threads"] == "1" and not r.get("skipped"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=eng)
        ax.set(title=f"{kind}: batch 1, 1 thread", xlabel="sequence length (word pieces)", ylabel="p50 ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_seq.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for eng in ("mtpf", "merged", "torch"):
        pts = sorted((x["k"], x["model_mb"]) for x in res["memory"] if x["engine"] == eng)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=eng)
    ax.set(xlabel="tasks loaded", ylabel="RSS above imports, MB", title="memory against number of tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory_vs_tasks.png", dpi=120)
    plt.close(fig)
    return []


# ================================================================= parent
class Runner:
    def __init__(self, quick: bool, log_path: Path) -> None:
        self.quick, self.errors, self.log_path = quick, [], log_path
        self.timeout = (QUICK if quick else FULL).worker_timeout_s

    def __call__(self, spec: dict) -> dict | None:
        spec = {**spec, "quick": self.quick}
        label = " ".join(str(spec.get(k)) for k in ("kind_of_run", "engine", "threads", "task", "mode", "k")
                         if spec.get(k) is not None)
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "mtpf_benchmarks.latency", "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.errors.append(f"{label}: timed out after {self.timeout}s")
            _log(f"   {label}: TIMEOUT")
            return None
        with open(self.log_path, "a") as f:
            f.write(f"### {label} (rc {proc.returncode})\n{proc.stderr}\n")
        lines = [ln[len(MARK):] for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            self.errors.append(f"{label}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
            _log(f"   {label}: FAILED (see {self.log_path})")
            return None
        _log(f"   {label}: {time.time() - t0:.1f}s")
        return json.loads(lines[-1])


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/latency.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to measure (default: build a MiniLM demo bundle)")
    ap.add_argument("--checkpoint", type=Path, help="the checkpoint the bundle was exported from: enables "
                    "the merged and torch alternatives and the K-task memory curve")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="about a minute: seq 16/64, batch 1, K <= 2, few reps")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT alternative")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    from mtpf_runtime.manifest import read_manifest, sha256_file

    p = QUICK if args.quick else FULL
    t_all = time.time()
    out = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (out / "workers.log").write_text("")
    if args.bundle is None:
        bundle, ckpt = demo_setup(work, args.quick)
    else:
        bundle, ckpt = args.bundle, args.checkpoint
    bundle = bundle.resolve()
    m = read_manifest(bundle)
    notes: list[str] = []
    if ckpt is not None:
        ckpt = ckpt.resolve()
        src = sha256_file(ckpt / "backbone" / "model.safetensors")
        if m.source_sha256 and src != m.source_sha256:
            print(f"error: {ckpt} is not the checkpoint {bundle} was exported from (backbone weights "
                  f"{src[:12]}… vs the bundle's {m.source_sha256[:12]}…)", file=sys.stderr)
            return 2
    else:
        notes.append("no --checkpoint: the merged and torch alternatives and the K-task memory curve need it; "
                     "only the bundle itself and the floor were measured")
    plan = plan_tasks(m)
    order = plan["order"]
    kinds = {n: m.tasks[n].kind for n in order}
    maxlen = {n: m.tasks[n].max_length for n in order}
    calls = lambda names: [[n, kinds[n], maxlen[n]] for n in names]  # noqa: E731
    ks = sorted({k for k in p.ks if k <= len(order)} | {min(len(order), max(p.ks))})
    if ckpt is None:
        ks = [len(order)]
    if max(ks) < 8:
        notes.append(f"the bundle has {len(order)} task(s): memory targets for 8 tasks are evaluated at K={max(ks)}")
    use_torch = ckpt is not None and not args.no_torch
    if ckpt is not None and args.no_torch:
        notes.append("--no-torch: the PyTorch + PEFT alternative was skipped")

    # ---- artifacts: K-task bundles and merged models (cached under OUT/work by their inputs)
    k_bundles: dict[int, Path] = {}
    merged: dict[str, str] = {}
    if ckpt is not None:
        from mtpf_export.bundle import export_bundle

        from .merged import build_merged_bundle

        q = m.quantization
        # Rebuild the K-task bundles and merged models with the bundle's own INT8 recipe.
        recipe = {"scheme": q.get("scheme", "per-channel"), "keep_fp32": q.get("fp32_preset", "ffn"),
                  "embeddings": q.get("embeddings", "fp32"), "adapter_dtype": m.lora_dtype}
        ck_key = {"source": src, "tasks": {n: _task_key(ckpt, n) for n in order}, "recipe": recipe}
        _log(f"== artifacts: K-task bundles {ks}, merged models (cached in {work})")
        for k in ks:
            if set(order[:k]) == set(m.tasks):
                k_bundles[k] = bundle
                continue
            dest = work / f"bundle_k{k}"
            k_bundles[k] = _cached(dest, {**ck_key, "tasks": order[:k], "precision": m.precision}, lambda d=dest, k=k:
                                   export_bundle(ckpt, d, precision=m.precision, tasks=order[:k], **recipe,
                                                 log=lambda *a: None))
        need = list(dict.fromkeys(order[: max(ks)] + [x for x in (plan["tc"], plan["ner"]) if x] + list(plan["pair"])))
        for n in need:
            dest = work / f"merged_{n}"
            t0 = time.time()
            merged[n] = str(_cached(dest, {**ck_key, "task": n, "precision": m.precision}, lambda d=dest, n=n:
                                    build_merged_bundle(ckpt, n, d, precision=m.precision,
                                                        scheme=recipe["scheme"], embeddings=recipe["embeddings"],
                                                        keep_fp32=m.quantization.get("fp32_matmuls_kept"))))
            _log(f"   merged {n}: {time.time() - t0:.1f}s")
    else:
        k_bundles[len(order)] = bundle

    run = Runner(args.quick, out / "workers.log")
    common = {"bundle": str(bundle), "checkpoint": str(ckpt) if ckpt else None}
    engines = ["mtpf", "floor"] + (["merged"] if merged else []) + (["torch"] if use_torch else [])

    # ---- latency sweeps: one process per (engine, threads, task)
    _log("== latency")
    latency, workers = [], []
    for eng in engines:
        for th in p.threads:
            for task in (plan["tc"], plan["ner"]):
                if task is None or (eng == "torch" and kinds[task] not in p.torch_latency_kinds):
                    continue
                r = run({**common, "kind_of_run": "latency", "engine": eng, "threads": th, "task": task,
                         "kind": kinds[task], "max_length": maxlen[task], "tasks": [task],
                         "merged": {task: merged.get(task)}})
                if r:
                    latency += r.pop("rows")
                    workers.append({**r, "threads": th, "task": task})

    # ---- memory: p.memory_repeats fresh processes per (engine, K), in rounds over all of them
    # so that whatever drifts over the run (page cache, the machine's load) reaches each alike.
    # Before Runtime trimmed its heap, one process's RSS differed from the next one's by up to 7 MB
    # with the same work (docs/benchmarks.md, session 20); repeats show whether any such noise is left.
    _log(f"== memory ({p.memory_repeats} processes per engine and K; torch one)")
    mem_specs = [{"engine": "floor", "k": 0, "bundle": str(bundle), "calls": calls(order[:1])}]
    for k in ks:
        mem_specs.append({"engine": "mtpf", "k": k, "bundle": str(k_bundles[k]), "calls": calls(order[:k])})
        if merged:
            mem_specs.append({"engine": "merged", "k": k, "merged": {n: merged[n] for n in order[:k]},
                              "calls": calls(order[:k])})
        if use_torch and (not args.quick or k == max(ks)):
            mem_specs.append({"engine": "torch", "k": k, "tasks": order[:k], "calls": calls(order[:k])})
    mem_runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(p.memory_repeats):
        for s in mem_specs:
            if s["engine"] == "torch" and rep:
                continue
            r = run({**common, **s, "kind_of_run": "memory", "threads": "1"})
            if r:
                mem_runs.setdefault((s["engine"], s["k"]), []).append(r)
    memory = [memory_summary(e, k, rs) for (e, k), rs in mem_runs.items()]

    # ---- task switching and the paired ratios
    _log("== task switching, adapter overhead, batch-32 throughput")
    switch = []
    if len(plan["pair"]) == 2:
        pair = [[n, kinds[n]] for n in plan["pair"]]
        for eng in engines:
            r = run({**common, "kind_of_run": "switch", "engine": eng, "pair": pair, "seq": 16 if args.quick else 64,
                     "tasks": list(plan["pair"]), "merged": {n: merged.get(n) for n in plan["pair"]}})
            if r:
                switch.append(r)
    else:
        notes.append("one task only: no task-switching measurement")
    paired = {}
    chosen = [n for n in (plan["tc"], plan["ner"]) if n]
    for mode in ("overhead", "throughput"):
        r = run({**common, "kind_of_run": "paired", "engine": "mtpf", "mode": mode, "calls": calls(chosen)})
        if r:
            paired[mode] = r

    multitask = {}
    if plan["tc"] and plan["ner"]:
        r = run({**common, "kind_of_run": "multitask", "engine": "mtpf",
                 "pair": [[plan["ner"], "ner"], [plan["tc"], "tc"]]})
        if r:
            multitask = r
    else:
        notes.append("needs one NER and one TC task: no shared-trunk / mixed-batch measurement")
    spin = {}
    if plan["tc"] and plan["ner"]:
        _log("== thread spinning (Runtime spin=False, the default, against spin=True)")
        for on in (False, True):
            r = run({**common, "kind_of_run": "spin", "engine": "mtpf", "spin": on, "threads": "all",
                     "pair": [[plan["ner"], "ner"], [plan["tc"], "tc"]]})
            if r:
                spin["on" if on else "off"] = r

    # ---- ratios and targets
    def mem_of(engine: str, k: int) -> dict | None:
        return next((x for x in memory if x["engine"] == engine and x["k"] == k), None)

    kmax = max(ks)
    mt, m1, mk = mem_of("mtpf", kmax), mem_of("merged", 1), mem_of("merged", kmax)

    def mem_ratio(a: dict | None, b: dict | None) -> dict:
        if not (a and b):
            return {"ratio": float("nan"), "ratio_ci95": None}
        return median_ratio(a["samples"]["model_mb"], b["samples"]["model_mb"])

    r_mt_m1, r_mk_mt = mem_ratio(mt, m1), mem_ratio(mk, mt)
    ov = paired.get("overhead", {}).get("tasks", {})
    tp = paired.get("throughput", {}).get("tasks", {})
    worst_ov = max(ov.values(), key=lambda x: x["ratio"], default={})
    worst_tp = min(tp.values(), key=lambda x: x["ratio"], default={})
    trunk = multitask.get("analyze", {})
    ratios = {
        "adapter_overhead": {"value": worst_ov.get("ratio", float("nan")), "ci95": worst_ov.get("ratio_ci95"),
                             "per_task": {n: x["ratio"] for n, x in ov.items()},
                             "what": "median over interleaved rounds of mtpf ms / floor ms, seq 128, batch 1, "
                                     "1 thread, one session (worst task kind)"},
        "rss_k_over_merged1": {"value": r_mt_m1["ratio"], "ci95": r_mt_m1["ratio_ci95"], "k": kmax,
                               "process_rss_ratio": ratio(mt and mt["rss_mb"], m1 and m1["rss_mb"]),
                               "with_trunk_session": ratio(mt and mt.get("model_mb_with_trunk_session"),
                                                           m1 and m1["model_mb"]),
                               "what": f"median mtpf RSS with {kmax} tasks / median of one merged INT8 model "
                                       "over fresh processes (RSS above the interpreter and imports; "
                                       "process_rss_ratio counts them too)"},
        "merged_k_over_mtpf": {"value": r_mk_mt["ratio"], "ci95": r_mk_mt["ratio_ci95"], "k": kmax,
                               "process_rss_ratio": ratio(mk and mk["rss_mb"], mt and mt["rss_mb"]),
                               "what": f"median {kmax} merged sessions RSS / median mtpf RSS with {kmax} tasks "
                                       "over fresh processes"},
        "throughput_b32": {"value": worst_tp.get("ratio", float("nan")), "ci95": worst_tp.get("ratio_ci95"),
                           "per_task": {n: x["ratio"] for n, x in tp.items()},
                           "what": "median over interleaved rounds of floor ms / mtpf ms (= mtpf texts/s / floor "
                                   "texts/s), batch 32, seq 128, all cores (worst task kind)"},
    }
    ratios["shared_trunk"] = {"value": trunk.get("ratio", float("nan")), "ci95": trunk.get("ratio_ci95"),
                              "what": "median over interleaved rounds of Runtime.analyze(text, [ner, tc]) ms / "
                                      "(tag + classify) ms, seq 64, batch 1, 1 thread (6-layer model, k = 2: "
                                      "layer count alone gives 0.67)"}
    ratios["mixed_batch"] = {"value": multitask.get("mixed", {}).get("ratio", float("nan")),
                             "what": "run_mixed over 32 rows of two tasks / grouping by task outside "
                                     "(time ratio; < 1 is faster)"}
    on, off = spin.get("on", {}), spin.get("off", {})
    ratios["spin_cpu"] = {"value": ratio(on.get("isolated_cpu_ms"), off.get("isolated_cpu_ms")),
                          "what": f"CPU time per isolated tag request ({PAUSE_S * 1e3:.0f} ms pause after each), "
                                  "spin=True / spin=False, all cores"}
    ratios["spin_back_to_back"] = {"value": ratio(on.get("back_to_back_p50_ms"), off.get("back_to_back_p50_ms")),
                                   "what": "tag p50 back to back, spin=True / spin=False, all cores (< 1: "
                                           "spinning is faster)"}
    if mem_of("mtpf", 1) and mt and kmax > 1:
        ratios["rss_per_extra_task_mb"] = {"value": (mt["model_mb"] - mem_of("mtpf", 1)["model_mb"]) / (kmax - 1),
                                           "what": "RSS each further task adds to mtpf"}
    targets = []
    for name, (op, bound, what) in TARGETS.items():
        v = ratios[name]["value"]
        needs8 = name in ("rss_k_over_merged1", "merged_k_over_mtpf")
        if not math.isfinite(v):
            status = "SKIP"
        elif needs8 and kmax < 8:
            status = "SKIP"
        else:
            status = "PASS" if (v <= bound if op == "<=" else v >= bound) else "FAIL"
        ci = ratios[name].get("ci95")
        note = f"measured at K={kmax}, the target is for K=8" if needs8 and kmax < 8 else None
        if status in ("PASS", "FAIL") and ci and ci[0] <= bound <= ci[1]:
            note = (f"the bound is inside the 95% interval {ci[0]:.3f}–{ci[1]:.3f}: "
                    "not resolved at this round count")
        targets.append({"target": name, "status": status, "value": v, "bound": f"{op} {bound}", "what": what,
                        "ci95": ci, **({"note": note} if note else {})})

    mach = machine_facts()
    mach["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    disk = {"bundle_mb": dir_mb(bundle),
            "backbone_mb": (bundle / m.backbone).stat().st_size / 1e6,
            "per_task_kb": {n: sum((bundle / f).stat().st_size for f in (t.head, t.adapter) if f) / 1e3
                            for n, t in m.tasks.items()},
            "merged_mb": {n: dir_mb(Path(d)) for n, d in merged.items()}}
    results = {"schema": 1, "quick": args.quick, "bundle": str(bundle), "checkpoint": str(ckpt) if ckpt else None,
               "params": asdict(p), "machine": mach, "tasks": {"order": order, **{k: plan[k] for k in ("tc", "ner")},
                                                              "pair": list(plan["pair"])},
               "latency": latency, "workers": workers, "memory": memory, "disk": disk, "switch": switch,
               "paired": paired, "multitask": multitask, "spin": spin, "ratios": ratios, "targets": targets,
               "notes": notes, "errors": run.errors,
               "elapsed_s": time.time() - t_all}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    notes += plots(results, out)
    results["notes"] = notes
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    for t in targets:
        print(f"{t['status']} {t['target']}: {t['value']:.3f} ({t['bound']}; {t['what']})"
              + (f" [{t['note']}]" if t.get("note") else ""))
    _log(f"done in {time.time() - t_all:.0f}s: {out / 'results.json'}, {out / 'results.md'}")
    if run.errors:
        print("worker errors:\n  " + "\n  ".join(run.errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: re-enter as the installed package
        from mtpf_benchmarks.latency import main as _main

        sys.exit(_main())
    sys.exit(main())
