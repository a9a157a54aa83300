"""Paired timing of the shared trunk with and without ONNX Runtime's SkipLayerNormalization
fusion (docs/benchmarks.md, session 19): ``analyze(text, [ner0, tc0])`` against ``tag`` +
``classify``, seq 64, batch 1, 1 thread, calls interleaved in one process. Usage::

    python docs/reproduce/paired_trunk_skipln.py BENCH_OUT [ROUNDS]

BENCH_OUT is a ``benchmarks/latency.py --out`` folder (its ``work/demo_bundle``).
"""
import sys
from pathlib import Path

import numpy as np

import mtpf_runtime.runtime as runtime
from mtpf_benchmarks.latency import _tokenizer, interleaved_times, piece_texts, round_ratios
from mtpf_runtime import Runtime

bundle = Path(sys.argv[1]) / "work" / "demo_bundle"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 300
text = piece_texts(_tokenizer(str(bundle)), 64, 1)[0]
for name, disabled in (("unfused (the runtime)", ["SkipLayerNormFusion"]), ("fused (ONNX Runtime's default)", [])):
    runtime._DISABLED_OPTIMIZERS[:] = disabled  # read when each session is made
    rt = Runtime(bundle, threads=1)
    ta, tb = interleaved_times(lambda: rt.analyze(text, ["ner0", "tc0"]),
                               lambda: (rt.tag(text, task="ner0"), rt.classify(text, task="tc0")), rounds)
    r = round_ratios(ta, tb)
    print(f"{name}: analyze {np.median(ta):.2f} ms, two calls {np.median(tb):.2f} ms, "
          f"ratio {r['ratio']:.3f} (95% interval {r['ratio_ci95'][0]:.3f}–{r['ratio_ci95'][1]:.3f})")
