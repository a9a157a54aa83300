"""Paired timing on the latency benchmark's demo checkpoint (docs/benchmarks.md, session 17).

The Cast that float16 adapters add to a request, and the shared-trunk ratio under trunk-first
and every-layer ``auto:6``; all calls interleaved in one process, 1 thread. Usage::

    python docs/reproduce/paired_trunk_fp16.py BENCH_OUT [ROUNDS]

BENCH_OUT is a ``benchmarks/latency.py --out`` folder (its ``work/demo_ckpt`` and
``work/demo_bundle``); the two comparison bundles are exported beside them.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from mtpf_export.bundle import export_bundle
from mtpf_runtime import Runtime

W = Path(sys.argv[1]) / "work"
ck = W / "demo_ckpt"
B = {"trunk6_a16": W / "demo_bundle"}
for name, kw in {"trunk6_a32": {"keep_fp32": "auto:6", "adapter_dtype": "float32"},
                 "any6_a32": {"keep_fp32": "auto-any:6", "adapter_dtype": "float32"}}.items():
    out = W / f"paired_{name}"
    if not (out / "manifest.json").exists():
        export_bundle(ck, out, ort_format=False, log=lambda *a: None, **kw)
    B[name] = out
rts = {n: Runtime(p, threads=1) for n, p in B.items()}
for n, rt in rts.items():
    print(n, rt.manifest.lora_dtype, rt.manifest.quantization["fp32_matmuls_kept"])
rng = np.random.default_rng(0)
words = "the of and a to in is was for on that with as by at from his her an film city".split()


def text(n):
    return " ".join(rng.choice(words, n))


t128, t64 = text(126), text(62)
for rt in rts.values():  # warm-up: two calls each, as the benchmark does
    for _ in range(3):
        rt.classify(t128, "tc0"); rt.tag(t64, "ner0"); rt.analyze(t64, ["ner0", "tc0"])
floor = rts["trunk6_a16"].without_adapters()


res = {k: [] for k in ["a16", "a32", "floor", "an_trunk", "sep_trunk", "an_any", "sep_any"]}


def clock(f):
    t0 = time.perf_counter(); f(); return time.perf_counter() - t0
for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 300):
    res["a16"].append(clock(lambda: rts["trunk6_a16"].classify(t128, "tc0")))
    res["a32"].append(clock(lambda: rts["trunk6_a32"].classify(t128, "tc0")))
    res["floor"].append(clock(lambda: floor.classify(t128, "tc0")))
    for tag, n in (("trunk", "trunk6_a16"), ("any", "any6_a32")):
        rt = rts[n]
        res["an_" + tag].append(clock(lambda: rt.analyze(t64, ["ner0", "tc0"])))
        res["sep_" + tag].append(clock(lambda: (rt.tag(t64, "ner0"), rt.classify(t64, "tc0"))))
med = {k: float(np.median(v)) * 1e3 for k, v in res.items()}
print(json.dumps({k: round(v, 3) for k, v in med.items()}))
print("a16/floor %.3f  a32/floor %.3f  a16/a32 %.3f" % (med["a16"] / med["floor"], med["a32"] / med["floor"], med["a16"] / med["a32"]))
print("shared trunk: trunk-first auto:6 %.3f, auto-any:6 %.3f" % (med["an_trunk"] / med["sep_trunk"], med["an_any"] / med["sep_any"]))
