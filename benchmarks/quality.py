"""INT8 quality: every task's metric through each quantization recipe, against its fp32 export.

For a trained checkpoint, each recipe (a scheme, the MatMuls kept fp32, the embedding table)
is exported as a bundle and every task is scored through the real ``Runtime`` on its data
set's dev and test splits: seqeval strict entity F1 for NER (``Runtime.tag`` on the words
joined by spaces, entities mapped back to word tags), accuracy for classification
(``Runtime.classify``). The fp32 export is the reference; the gap is recipe minus fp32, in
points. Pick recipes on dev, report test.

    python -m mtpf_benchmarks.quality --checkpoint ckpt/ --out runs/quality
    python -m mtpf_benchmarks.quality --checkpoint ckpt/ --recipe int8-ffn --recipe int8-auto4-emb8

Writes ``results.json`` and ``results.md`` (the table of docs/quantization.md) in ``--out``.
The checkpoint's tasks must name a registered (../shared/data) or embedded data set in their
``dataset`` field, as ``mtpf-adapt`` writes it; other tasks are skipped with a note.

``--checkpoint`` may be given several times: checkpoints with the same backbone weights (the
one-task folders ``mtpf-compare`` writes for one pre-finetuned encoder, say) go into one bundle
per recipe, the first exported whole and the others added to it (``mtpf-export --add``), as an
app shipping all those features would build it. Task names must not repeat across them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _r(scheme: str, keep_fp32: str, embeddings: str, adapter_dtype: str = "float32") -> dict[str, Any]:
    return {"scheme": scheme, "keep_fp32": keep_fp32, "embeddings": embeddings, "adapter_dtype": adapter_dtype}


# name -> export_bundle keyword arguments. "fp32" is the reference every gap is taken against.
RECIPES: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    # Every INT8 recipe names its scheme, its embedding table and its adapters ("-emb8" means
    # INT8 rows, no suffix fp32; "-tok-" per-token activation scales, otherwise ONNX Runtime's
    # per-channel dynamic INT8; "-a16" float16 adapters, otherwise float32). Left out, each would
    # follow export's default, which has changed, and a recipe would silently measure something
    # other than its name. "-autoN" ranks the fp32 MatMuls over every layer (`auto-any:N`, what
    # `auto:N` meant until session 17); "-trunkN" is `auto:N`, the shared trunk first.
    "int8-tensor": _r("per-tensor", "none", "fp32"),
    "int8-all": _r("per-channel", "none", "fp32"),
    "int8-all-emb8": _r("per-channel", "none", "int8"),
    "int8-ffnout": _r("per-channel", "ffn_out", "fp32"),
    "int8-ffn": _r("per-channel", "ffn", "fp32"),
    "int8-ffn-emb8": _r("per-channel", "ffn", "int8"),
    "int8-auto2-emb8": _r("per-channel", "auto-any:2", "int8"),
    "int8-auto4-emb8": _r("per-channel", "auto-any:4", "int8"),
    "int8-auto6": _r("per-channel", "auto-any:6", "fp32"),
    "int8-auto6-emb8": _r("per-channel", "auto-any:6", "int8"),
    "int8-auto8-emb8": _r("per-channel", "auto-any:8", "int8"),
    "int8-auto12-emb8": _r("per-channel", "auto-any:12", "int8"),
    # per-token: each token's activations get their own INT8 scale (export/quantize.py)
    "int8-tok-all-emb8": _r("per-token", "none", "int8"),
    "int8-tok-auto6-emb8": _r("per-token", "auto-any:6", "int8"),  # the default in session 15-16
    # auto:6 from the shared trunk first; with float16 adapters, the default since session 17
    "int8-tok-trunk6-emb8": _r("per-token", "auto:6", "int8"),
    "int8-tok-trunk6-a16-emb8": _r("per-token", "auto:6", "int8", "float16"),
    "int8-tok-trunk5+1-a16-emb8": _r("per-token", "auto:5+1", "int8", "float16"),
    "static-all": _r("static", "none", "fp32"),
    "static-ffn": _r("static", "ffn", "fp32"),
}
BOUND = 0.5  # points: the "within 0.5 of fp32" for every task


def load_task_data(dataset: str, max_eval: int, seed: int = 0) -> Any:
    """The data set a task was trained on, with dev and test cut to ``max_eval`` (seeded)."""
    from dataclasses import replace

    from mtpf_training import data as D
    from mtpf_training.embedded import load_embedded

    try:
        ds = D.load_dataset(dataset)
    except D.DataError:
        ds = load_embedded(dataset)
    rng = np.random.default_rng(seed)

    def cut(split: tuple) -> tuple:
        if len(split) <= max_eval:
            return split
        keep = np.sort(rng.permutation(len(split))[:max_eval])
        return tuple(split[i] for i in keep)

    return replace(ds, dev=cut(ds.dev), test=cut(ds.test))


def checkpoint_tasks(ckpts: Sequence[Path], names: Sequence[str] | None) -> dict[Path, list]:
    """Each checkpoint's tasks (``names`` picks among all of them), checked before any export:
    the checkpoints share one backbone and no task name repeats."""
    from mtpf_export.bundle import read_checkpoint_tasks
    from mtpf_runtime.manifest import sha256_file

    ckpts = list(dict.fromkeys(Path(c) for c in ckpts))
    shas = {}
    for c in ckpts:
        f = c / "backbone" / "model.safetensors"
        if not f.is_file():
            raise ValueError(f"{c}: not a checkpoint (no backbone/model.safetensors)")
        shas[c] = sha256_file(f) if len(ckpts) > 1 else ""
    if len(set(shas.values())) > 1:
        first = ckpts[0]
        other = next(c for c in ckpts if shas[c] != shas[first])
        raise ValueError(f"{other} has other backbone weights than {first} ({shas[other][:12]}… against "
                         f"{shas[first][:12]}…): one bundle holds tasks of one backbone; run them separately")
    out, seen = {}, {}
    for c in ckpts:
        have = read_checkpoint_tasks(c)
        keep = [t for t in have if names is None or t.name in names]
        for t in keep:
            if t.name in seen:
                raise ValueError(f"task {t.name!r} is in both {seen[t.name]} and {c}; one bundle holds one "
                                 f"task of a name (pick with --task)")
            seen[t.name] = c
        out[c] = keep
    missing = sorted(set(names or ()) - set(seen))
    if missing:
        raise ValueError(f"--task {missing}: in none of the checkpoints (they have {sorted(seen) or 'none'})")
    return {c: ts for c, ts in out.items() if ts}


def word_tags(entities: Sequence[Any], spans: Sequence[tuple[int, int]]) -> list[str]:
    """IOB2 tags of the words at ``spans`` (char offsets) from a ``tag`` result."""
    tags = ["O"] * len(spans)
    for ent in entities:
        inside = [i for i, (s, e) in enumerate(spans) if s >= ent.start and e <= ent.end]
        for j, i in enumerate(inside):
            tags[i] = ("B-" if j == 0 else "I-") + ent.label
    return tags


def score_ner(rt: Any, task: str, examples: Sequence[Any]) -> float:
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    texts, spans = [], []
    for ex in examples:
        pos, sp = 0, []
        for tok in ex.tokens:
            sp.append((pos, pos + len(tok)))
            pos += len(tok) + 1
        texts.append(" ".join(ex.tokens))
        spans.append(sp)
    results = rt.tag(texts, task=task)
    pred = [word_tags(ents, sp) for ents, sp in zip(results, spans)]
    gold = [list(ex.tags) for ex in examples]
    return 100.0 * float(f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0))


def score_tc(rt: Any, task: str, examples: Sequence[Any]) -> float:
    results = rt.classify([ex.text for ex in examples], task=task)
    return 100.0 * float(np.mean([r.label == ex.label for r, ex in zip(results, examples)]))


SPEED_SEQS = (16, 64, 128)


def paired_latency(bundles: dict[str, Path], task: str, kind: str, rounds: int = 30) -> dict[str, dict[int, float]]:
    """Median ms of one request (batch 1, 1 thread) of ``SPEED_SEQS`` word pieces through each
    bundle, the bundles' calls interleaved round by round (in alternating order), so every
    recipe sees the same machine state; an indication, benchmarks/latency.py measures speed."""
    from mtpf_runtime import Runtime

    rts = {name: Runtime(b, threads=1, verify=False) for name, b in bundles.items()}
    out: dict[str, dict[int, float]] = {name: {} for name in rts}
    for seq in SPEED_SEQS:
        text = " ".join(["the"] * (seq - 2))
        calls = {name: (lambda rt=rt: rt.classify(text, task=task)) if kind == "tc" else
                 (lambda rt=rt: rt.tag(text, task=task)) for name, rt in rts.items()}
        for fn in calls.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
        for name, v in times.items():
            out[name][seq] = float(np.median(v))
    return out


def evaluate_recipe(bundle: Path, tasks: dict[str, Any], threads: int | None, batch_size: int = 32) -> dict[str, Any]:
    from mtpf_runtime import Runtime

    rt = Runtime(bundle, threads=threads, batch_size=batch_size)
    out: dict[str, Any] = {}
    for name, (kind, ds) in tasks.items():
        score = score_ner if kind == "ner" else score_tc
        # A data set without a dev split (e.g. TREC) is scored on test only.
        out[name] = {split: score(rt, name, getattr(ds, split)) if getattr(ds, split) else None
                     for split in ("dev", "test")}
    return out


def bundle_mb(bundle: Path) -> dict[str, float]:
    """What a phone downloads for the backbone (mobile/ excluded: it is a copy in ORT format)."""
    sizes = {p.name: p.stat().st_size / 1e6 for p in bundle.glob("*.onnx")}
    return {"backbone_mb": sizes.get("backbone.onnx", 0.0), "top_mb": sizes.get("top.onnx", 0.0)}


def markdown(res: dict[str, Any]) -> str:
    tasks = res["tasks"]
    ref = res["recipes"]["fp32"]
    lines = [f"Checkpoint `{res['checkpoint']}`; dev/test cut to {res['max_eval']} examples each (seeded), "
             f"scored in batches of {res.get('batch_size', 32)}; "
             f"{res['machine']}; {res['seconds']:.0f} s in all."
             + (f" Sample texts for auto:N: the built-in ones and {res['sample_file']['texts']} from "
                f"`{res['sample_file']['path']}`." if res.get("sample_file") else ""), "",
             "Test metric per task (F1 for NER, accuracy for TC), and in brackets the gap to the fp32 export "
             f"in points. `worst dev` / `worst test`: the largest loss over the tasks; bound {BOUND}. "
             "`ms 16/64/128`: one request of 16, 64 and 128 word pieces, batch 1, 1 thread, median of 30, "
             "every recipe's calls interleaved in one process; `× fp32`: the 128-piece time over fp32's "
             "(indicative only; benchmarks/latency.py measures speed properly).", "",
             "Tasks: " + "; ".join(f"{n} ({t['kind']}, {t['dataset']}: dev {t['dev']}, test {t['test']})"
                                    for n, t in tasks.items()) + ".", ""]
    head = ["recipe", "backbone.onnx MB", "ms 16/64/128", "× fp32"] + list(tasks) + ["worst dev", "worst test",
                                                                                     "all within"]
    ref_ms = ref.get("latency_ms", {}).get("128")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["recipes"].items():
        if "error" in r:
            lines.append(f"| {name} | | | | " + " | ".join("" for _ in tasks) + f" | | | failed: {r['error']} |")
            continue
        ms = r.get("latency_ms", {})
        cells = [name, f"{r['size']['backbone_mb']:.1f}",
                 " / ".join(f"{ms[str(q)]:.1f}" for q in SPEED_SEQS) if ms else "",
                 f"{ms['128'] / ref_ms:.2f}" if ms and ref_ms else ""]
        worst = {}
        for split in ("dev", "test"):
            worst[split] = max((ref["scores"][t][split] - r["scores"][t][split] for t in tasks
                                if r["scores"][t][split] is not None), default=None)
        for t in tasks:
            v, d = r["scores"][t]["test"], r["scores"][t]["test"] - ref["scores"][t]["test"]
            cells.append(f"{v:.2f}" + ("" if name == "fp32" else f" ({d:+.2f})"))
        ok = all(w is None or w <= BOUND for w in worst.values())
        cells += ["" if name == "fp32" or w is None else f"{w:.2f}" for w in (worst["dev"], worst["test"])]
        cells += ["" if name == "fp32" else ("yes" if ok else "no")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtpf_benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, action="append", required=True,
                    help="trained checkpoint (mtpf-adapt); repeat it for checkpoints that share one backbone, "
                         "whose tasks then go into one bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--recipe", action="append", choices=list(RECIPES),
                    help="recipe to measure (repeatable; default all). fp32 is always measured")
    ap.add_argument("--task", action="append", help="only these tasks (default: all with a known data set)")
    ap.add_argument("--max-eval", type=int, default=1000, help="dev and test examples per task (seeded cut)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for scoring")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="texts per backbone run while scoring (Runtime's batch_size; 1 scores every text alone)")
    ap.add_argument("--sample-file", type=Path,
                    help="texts (one per line, UTF-8) added to the export's built-in sample texts, as "
                         "mtpf-export --sample-file: they rank the MatMuls for auto:N and calibrate static")
    args = ap.parse_args(argv)

    from mtpf_export.bundle import ExportError, export_bundle, read_sample_file
    from mtpf_runtime.manifest import read_manifest

    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.time()
    samples = None
    if args.sample_file:
        try:
            samples = [ln for ln in read_sample_file(args.sample_file) if ln.strip()]
        except ExportError as e:
            print(f"quality: {e}", file=sys.stderr)
            return 2
        if not samples:
            print(f"quality: --sample-file {args.sample_file} has no text", file=sys.stderr)
            return 2
    try:
        per_ckpt = checkpoint_tasks(args.checkpoint, args.task)
    except (ExportError, ValueError) as e:
        print(f"quality: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    notes, tasks, owner = [], {}, {}
    for ckpt, ck_tasks in per_ckpt.items():
        for t in ck_tasks:
            cfg = json.loads((ckpt / "tasks" / f"{t.name}.json").read_text())
            dataset = cfg.get("dataset")
            try:
                tasks[t.name] = (t.kind, load_task_data(dataset, args.max_eval))
                owner[t.name] = ckpt
            except Exception as e:  # noqa: BLE001 - reported, the task is skipped
                notes.append(f"task {t.name!r} skipped: data set {dataset!r} not loadable ({e})")
    if not tasks:
        print("quality: no task with a loadable data set", file=sys.stderr)
        return 2
    recipes = ["fp32"] + [r for r in (args.recipe or RECIPES) if r != "fp32"]
    label = str(args.checkpoint[0]) if len(args.checkpoint) == 1 else f"{len(per_ckpt)} checkpoints, one backbone"
    res: dict[str, Any] = {"checkpoint": label, "checkpoints": [str(c) for c in per_ckpt],
                           "max_eval": args.max_eval, "batch_size": args.batch_size, "notes": notes,
                           "sample_file": None if samples is None else
                           {"path": str(args.sample_file), "texts": len(samples)},
                           "tasks": {n: {"kind": k, "dataset": ds.name, "dev": len(ds.dev), "test": len(ds.test)}
                                     for n, (k, ds) in tasks.items()},
                           "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
                           "recipes": {}}
    work = args.out / "bundles"
    # the scored tasks by checkpoint, in the order given; the first build carries every later task's LoRA slots
    groups = {c: [t for t, o in owner.items() if o == c] for c in dict.fromkeys(owner.values())}
    order = list(groups)
    for name in recipes:
        dest = work / name
        t1 = time.time()
        try:
            for i, ckpt in enumerate(order):
                export_bundle(ckpt, dest, tasks=groups[ckpt], add_to=i > 0,
                              slots_for=order[1:] if i == 0 else (), ort_format=False, log=lambda *a: None,
                              sample_texts=samples, **RECIPES[name])
        except Exception as e:  # noqa: BLE001 - a recipe that cannot be exported is a result too
            res["recipes"][name] = {"kwargs": RECIPES[name], "error": f"{type(e).__name__}: {e}"}
            print(f"{name}: export failed: {e}", flush=True)
            shutil.rmtree(dest, ignore_errors=True)  # a bundle holding only the tasks added before the failure
            res["seconds"] = time.time() - t0
            (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
            if name == "fp32":  # every gap is taken against it: nothing else can be scored
                print(f"quality: the fp32 reference could not be exported ({e}); see {args.out / 'results.json'}",
                      file=sys.stderr)
                return 1
            continue
        scores = evaluate_recipe(dest, tasks, args.threads, args.batch_size)
        q = read_manifest(dest).quantization
        res["recipes"][name] = {"kwargs": RECIPES[name], "scores": scores, "size": bundle_mb(dest),
                                "fp32_matmuls_kept": q.get("fp32_matmuls_kept", []), "seconds": time.time() - t1}
        print(f"{name}: " + ", ".join(f"{t}={v['test']:.2f}" for t, v in scores.items())
              + f" ({time.time() - t1:.0f}s)", flush=True)
        res["seconds"] = time.time() - t0
        (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    built = {name: work / name for name, r in res["recipes"].items() if "scores" in r}
    first = next(iter(tasks))
    for name, ms in paired_latency(built, first, tasks[first][0]).items():
        res["recipes"][name]["latency_ms"] = {str(q): v for q, v in ms.items()}
    shutil.rmtree(work, ignore_errors=True)  # bundles are kept only for the paired speed measurement
    res["seconds"] = time.time() - t0
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
