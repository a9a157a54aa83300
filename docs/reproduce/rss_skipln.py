"""RSS of a Runtime with every task of a bundle served twice, SkipLayerNormalization fusion on or
off (docs/benchmarks.md, session 19). One fresh process per call::

    python docs/reproduce/rss_skipln.py BUNDLE unfused|fused
"""
import sys

import psutil

import mtpf_runtime.runtime as R
from mtpf_runtime import Runtime

mode = sys.argv[2]
if mode == "fused":
    R._DISABLED_OPTIMIZERS[:] = []  # read when the session is made
p = psutil.Process()
base = p.memory_info().rss / 1e6
rt = Runtime(sys.argv[1], threads=1)
text = "the of and to in is that for it as was with " * 10
for name, spec in rt.manifest.tasks.items():
    for _ in range(2):
        (rt.tag if spec.kind == "ner" else rt.classify)(text, task=name)
print(mode, round(p.memory_info().rss / 1e6 - base, 1))
