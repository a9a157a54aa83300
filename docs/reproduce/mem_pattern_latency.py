"""Latency with ONNX Runtime's memory pattern off (the runtime's default since session 20) against
on: two Runtimes of one bundle in one process, calls interleaved (docs/benchmarks.md)::

    python docs/reproduce/mem_pattern_latency.py BUNDLE

Prints off / on as the median of per-round ratios with its 95% interval.
"""
import sys

import numpy as np

import mtpf_runtime.runtime as R
from mtpf_benchmarks.latency import _tokenizer, interleaved_times, piece_texts, plan_tasks, round_ratios

bundle = sys.argv[1]
tok = _tokenizer(bundle)
make_session = R._session
pattern = {"on": True}


def _session(path, opts, data=None):
    opts.enable_mem_pattern = pattern["on"]
    return make_session(path, opts, data)


R._session = _session


def runtime(on: bool, threads: int) -> R.Runtime:
    pattern["on"] = on
    rt = R.Runtime(bundle, threads=threads, batch_size=32)
    rt._top_session()  # both sessions made under the setting asked for
    return rt


off1, on1 = runtime(False, 1), runtime(True, 1)
plan = plan_tasks(off1.manifest)
tc, ner = plan["tc"], plan["ner"]
t128, t64 = piece_texts(tok, 128, 1), piece_texts(tok, 64, 1)[0]
off2, on2 = runtime(False, 2), runtime(True, 2)
t32 = piece_texts(tok, 128, 32)
cases = [
    ("classify seq 128, batch 1, 1 thread", lambda rt: rt.classify(t128, tc), off1, on1, 200),
    ("tag seq 128, batch 1, 1 thread", lambda rt: rt.tag(t128, ner), off1, on1, 200),
    ("analyze seq 64, 1 thread", lambda rt: rt.analyze(t64, [ner, tc]), off1, on1, 200),
    ("classify seq 128, batch 32, 2 threads", lambda rt: rt.classify(t32, tc), off2, on2, 20),
]
for name, call, off, on, rounds in cases:
    a, b = interleaved_times(lambda: call(off), lambda: call(on), rounds)
    r = round_ratios(a, b)
    lo, hi = r["ratio_ci95"]
    print(f"{name}: off / on {r['ratio']:.3f} ({lo:.3f}-{hi:.3f}); {np.median(a):.2f} against {np.median(b):.2f} ms")
