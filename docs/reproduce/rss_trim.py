"""RSS of a Runtime above its imports, with and without handing the C heap's freed pages back
after each session is made (glibc ``malloc_trim``; docs/benchmarks.md, session 20). Each
measurement is its own fresh process; the settings alternate::

    python docs/reproduce/rss_trim.py BUNDLE [PROCESSES]

Prints, per process: MB after load, after every task served twice, after two ``analyze`` calls
of an NER and a TC task (which load ``top.onnx``).
"""
import json
import subprocess
import sys

if len(sys.argv) > 2 and sys.argv[2] in ("trim", "keep"):  # the child
    import psutil

    import mtpf_runtime.runtime as R
    from mtpf_runtime import Runtime

    if sys.argv[2] == "keep":
        R._MALLOC_TRIM = None  # read each time a session is made
    p = psutil.Process()
    text = "the of and to in is that for it as was with " * 10
    import onnxruntime  # noqa: F401  (imports before the base line, as in latency.py)
    base = p.memory_info().rss / 1e6
    rt = Runtime(sys.argv[1], threads=1)
    load = p.memory_info().rss / 1e6 - base
    for name, spec in rt.manifest.tasks.items():
        for _ in range(2):
            (rt.tag if spec.kind == "ner" else rt.classify)(text, task=name)
    served = p.memory_info().rss / 1e6 - base
    kinds = {spec.kind: name for name, spec in rt.manifest.tasks.items()}
    for _ in range(2):
        rt.analyze(text[:200], [kinds["ner"], kinds["tc"]])
    print(json.dumps([round(load, 1), round(served, 1), round(p.memory_info().rss / 1e6 - base, 1)]))
else:
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    got = {"trim": [], "keep": []}
    for _ in range(n):
        for mode in got:
            out = subprocess.run([sys.executable, __file__, sys.argv[1], mode], capture_output=True, text=True,
                                 check=True).stdout
            got[mode].append(json.loads(out.splitlines()[-1]))
    for mode, rows in got.items():
        print(mode, "load / served / after analyze, MB:", rows)
