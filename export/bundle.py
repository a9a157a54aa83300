"""Checkpoint -> bundle: build, check against torch, then swap into place atomically.

Steps: read the checkpoint's tasks -> build the fp32 graph with a LoRA input for every
slot any task's adapter uses -> quantize (int8) -> write adapters, heads, tokenizer and
manifest into a staging folder -> run the staged bundle through the real ``Runtime``
against torch + PEFT on sample text -> replace the old bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from mtpf_runtime.manifest import (
    MANIFEST, SCHEMA_VERSION, LoraSlotSpec, Manifest, TaskSpec, adapter_model_version, read_manifest,
    sha256_file,
)
from mtpf_training.arch import arch_for, parse_lora_key
from mtpf_training.checkpoint import load_task

from .graph import LORA_DTYPES, build_backbone
from .quantize import DEFAULT_SCHEME, SCHEMES, matmul_errors, quantize_backbone

FP32_PARITY_TOL = 1e-3  # max |logit difference| the fp32 export may show against torch
# Which weight MatMuls stay fp32 in an INT8 export, by logical LoRA-slot name in every layer.
# The study behind the default is docs/quantization.md (benchmarks/quality.py).
FP32_PRESETS = {"none": (), "ffn_out": ("ffn_out",), "ffn": ("ffn_in", "ffn_out")}
DEFAULT_FP32 = "auto:6"
DEFAULT_EMBEDDINGS = "int8"


def keep_fp32_help() -> str:
    return (f"a preset ({', '.join(FP32_PRESETS)}), 'auto:N' (the N weight MatMuls whose output dynamic "
            f"INT8 changes most on the sample texts, taken from the shared trunk when the bundle has one), "
            f"'auto:N+M' (N from the trunk and M from the adapted layers), 'auto-any:N' (the same ranking "
            f"over every layer), or a comma list of "
            f"target[@layer] items from query,key,value,attn_out,ffn_in,ffn_out (e.g. 'ffn_out@5,ffn_in@5')")


def fp32_keep_nodes(model_type: str, n_layers: int, spec: str = DEFAULT_FP32, *,
                    errors: dict[str, float] | None = None, split_layer: int | None = None) -> list[str]:
    """Graph node names of the weight MatMuls that ``spec`` keeps in fp32.

    ``errors`` (node -> sensitivity, ``quantize.matmul_errors``) is needed for ``auto:N``,
    ``auto:N+M`` and ``auto-any:N``. With a shared trunk (``split_layer``: the first adapted
    layer), ``auto:N+M`` takes the N most sensitive MatMuls of the trunk (layers below
    ``split_layer``) and the M most sensitive of the adapted layers; ``auto:N`` is
    ``auto:N+0``. A trunk with fewer than N MatMuls is filled up from the adapted layers.
    Layers from ``split_layer`` on run once per task in a multi-task call (``Runtime.analyze``),
    the trunk once per text, and fp32 MatMuls are the slow ones (docs/quantization.md).
    ``auto-any:N`` ranks every layer alike; without a trunk, ``auto:N+M`` is ``auto-any:N+M``.
    """
    arch = arch_for(model_type)

    def node(layer: int, target: str) -> str:
        return f"{arch.layers}.{layer}.{arch.modules[target]}.matmul"

    spec = spec.strip()
    if spec in FP32_PRESETS:
        return [node(i, t) for i in range(n_layers) for t in FP32_PRESETS[spec]]
    if spec.startswith(("auto:", "auto-any:")):
        kind, _, count = spec.partition(":")
        trunk_n, plus, top_n = count.partition("+")
        try:
            n, m = int(trunk_n), int(top_n) if plus else 0
        except ValueError:
            n = m = -1
        if n < 0 or m < 0 or (plus and kind != "auto"):
            raise ExportError(f"keep_fp32 {spec!r}: {kind} needs a count, e.g. {kind}:4"
                              + (" or auto:4+1" if kind == "auto" else ""))
        if errors is None:
            raise ExportError(f"keep_fp32 {spec!r} needs the MatMul sensitivities (matmul_errors)")
        ranked = sorted(errors, key=lambda k: -errors[k])
        if kind == "auto-any" or not split_layer:
            return ranked[:n + m]
        in_trunk = {node(i, t) for i in range(split_layer) for t in arch.modules}
        trunk, top = [k for k in ranked if k in in_trunk], [k for k in ranked if k not in in_trunk]
        keep = trunk[:n] + top[:m]
        # a trunk with fewer than n MatMuls is filled up from the adapted layers, in rank order
        return keep + top[m:][: n + m - len(keep)]
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        target, _, layer = item.partition("@")
        if target not in arch.modules:
            raise ExportError(f"keep_fp32 {spec!r}: unknown target {target!r}; {keep_fp32_help()}")
        if layer and not (layer.isdigit() and int(layer) < n_layers):
            raise ExportError(f"keep_fp32 {spec!r}: layer {layer!r} is not in 0..{n_layers - 1}")
        out += [node(int(layer), target)] if layer else [node(i, target) for i in range(n_layers)]
    if not out:
        raise ExportError(f"keep_fp32 {spec!r}: {keep_fp32_help()}")
    return list(dict.fromkeys(out))


SAMPLE_TEXTS = [
    "EU rejects German call to boycott British lamb.",
    "Peter Blackburn met Angela Merkel in Berlin on Monday.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "The film was a charming and often affecting journey.",
    "I can't believe how bad the service was at this restaurant in Chicago.",
    "What is the capital city of Australia?",
    "Microsoft and Google announced new AI models at a conference in San Francisco.",
    "The patient was diagnosed with type 2 diabetes and hypertension.",
    "Manchester United beat Arsenal 2-1 at Old Trafford on Saturday.",
    "Stocks fell sharply after the Federal Reserve raised interest rates.",
    "so happy today!!! going to the beach with @john :)",
    "The new iPhone has a great camera but the battery life is disappointing.",
    "Barack Obama was born in Honolulu, Hawaii.",
    "She studied physics at the University of Cambridge before joining NASA.",
    "",
    "A very long sentence " + "that keeps going and going " * 40 + "until it ends in Paris.",
]


class ExportError(RuntimeError):
    """Export refused or failed its own check; the old bundle (if any) is untouched."""


def read_sample_file(path: Path) -> list[str]:
    """The lines of a ``--sample-file`` (UTF-8, one text per line), added to ``SAMPLE_TEXTS``."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read --sample-file {path}: {e}") from e


@dataclass(frozen=True)
class CkptTask:
    name: str
    kind: str
    labels: tuple[str, ...]
    adapter: str | None
    max_length: int
    head_weight: np.ndarray
    head_bias: np.ndarray


# ---------------------------------------------------------------- checkpoint reading
def read_checkpoint_tasks(ckpt: Path, names: list[str] | None = None) -> list[CkptTask]:
    tdir = ckpt / "tasks"
    if not (ckpt / "backbone" / "config.json").is_file():
        raise ExportError(f"{ckpt}: not a checkpoint (no backbone/config.json); train one with mtpf-adapt")
    available = sorted(p.stem for p in tdir.glob("*.json")) if tdir.is_dir() else []
    if not available:
        raise ExportError(f"{ckpt}: the checkpoint has no tasks (tasks/*.json); add one with mtpf-adapt")
    names = names or available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ExportError(f"{ckpt}: tasks {unknown} not in the checkpoint; it has {available}")
    out = []
    for n in names:
        try:
            t = load_task(ckpt, n)  # refuses a task whose head or adapter changed after its json
        except ValueError as e:  # CheckpointError, or a task file name save_task would not write
            raise ExportError(str(e)) from None
        out.append(CkptTask(n, t.kind, t.labels, t.meta.get("adapter"), int(t.meta.get("max_length", 128)),
                            t.head_weight.astype(np.float32), t.head_bias.astype(np.float32)))
    return out


def read_lora(ckpt: Path, adapter: str, model_type: str) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """PEFT adapter -> {(layer, target): (A^T [in, r], (scaling * B)^T [r, out])}."""
    from safetensors.numpy import load_file

    adir = ckpt / "adapters" / adapter
    cfg_path, w_path = adir / "adapter_config.json", adir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ExportError(f"{adir}: missing adapter_config.json or adapter_model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    for key, ok in (("use_dora", False), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise ExportError(f"{cfg_path}: {key}={cfg[key]!r} cannot be exported; mtpf exports plain LoRA")
    if cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise ExportError(f"{cfg_path}: alpha_pattern / modules_to_save are not supported by the exporter")
    arch = arch_for(model_type)
    mats: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, val in load_file(str(w_path)).items():
        parsed = parse_lora_key(arch, key)
        if parsed is None:
            raise ExportError(f"{w_path}: tensor {key!r} is not a LoRA A/B matrix mtpf can export")
        layer, target, which = parsed
        mats.setdefault((layer, target), {})[which] = val.astype(np.float32)
    out = {}
    for slot, ab in mats.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{w_path}: slot {slot} lacks its {'B' if 'A' in ab else 'A'} matrix")
        r = ab["A"].shape[0]
        alpha = cfg.get("lora_alpha", r)
        scaling = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[slot] = (np.ascontiguousarray(ab["A"].T), np.ascontiguousarray((ab["B"] * scaling).T))
    return out


def write_adapter(path: Path, lora: dict, fingerprint: str, dtype: str = "float32") -> None:
    import onnxruntime as ort

    from mtpf_training.arch import graph_input_name

    # AdapterFormat keeps only the OrtValues: keep the numpy arrays alive until export.
    arrays = {}
    for (layer, target), pair in sorted(lora.items()):
        for which, x in zip("AB", pair):
            name = graph_input_name(layer, target, which)
            arrays[name] = np.ascontiguousarray(x, LORA_DTYPES[dtype][1])
            if not np.isfinite(arrays[name]).all() and np.isfinite(x).all():
                raise ExportError(f"adapter {path.name}: {name} has values beyond {dtype}'s range (largest "
                                  f"|value| {float(np.abs(x).max()):.3g}); export with --adapter-dtype float32")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(SCHEMA_VERSION)
    fmt.set_model_version(adapter_model_version(fingerprint))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    del arrays


# ---------------------------------------------------------------- bundle writing
def write_ort_format(stage: Path, graphs: list[str]) -> dict[str, str]:
    """``mobile/<name>.ort`` for each graph, with ONNX Runtime's own converter.

    ``--target_platform arm``: the optimizations baked into the file are the ones that
    suit phones; the file still runs on x86 (the tests load it here).
    """
    import subprocess
    import sys

    mobile = stage / "mobile"
    mobile.mkdir()
    with tempfile.TemporaryDirectory(dir=stage.parent) as tmp:
        for g in graphs:
            os.link(stage / g, Path(tmp) / g)
        proc = subprocess.run(
            [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", tmp,
             "--optimization_style", "Fixed", "--target_platform", "arm"],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportError(f"ORT-format conversion failed: {proc.stderr.strip()[-2000:]}")
        out = {}
        for g in graphs:
            name = Path(g).stem
            os.replace(Path(tmp) / f"{name}.ort", mobile / f"{name}.ort")
            out[name] = f"mobile/{name}.ort"
        os.replace(Path(tmp) / "required_operators.config", mobile / "required_operators.config")
    return out



def _producer() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("mtpf", "onnx", "onnxruntime", "torch", "transformers", "peft", "tokenizers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _tokenizer_info(backbone: Path, dest: Path) -> dict:
    from tokenizers import Tokenizer

    src = backbone / "tokenizer.json"
    if not src.is_file():
        raise ExportError(f"{src}: the checkpoint backbone has no tokenizer.json (a fast tokenizer is required)")
    tok = Tokenizer.from_file(str(src))
    tok.no_truncation()
    tok.no_padding()
    tok.save(str(dest))
    ids = {}
    for key, token in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
        tid = tok.token_to_id(token)
        if tid is None:
            raise ExportError(f"{src}: tokenizer lacks {token}; only BERT-style wordpiece vocabularies are supported")
        ids[key] = tid
    return ids


def _write_task_files(stage: Path, task: CkptTask, lora: dict | None, fingerprint: str,
                      lora_dtype: str = "float32") -> TaskSpec:
    (stage / "heads").mkdir(exist_ok=True)
    (stage / "adapters").mkdir(exist_ok=True)
    head_rel = f"heads/{task.name}.npz"
    np.savez(stage / head_rel, weight=task.head_weight, bias=task.head_bias)
    adapter_rel = None
    if lora:
        adapter_rel = f"adapters/{task.name}.onnx_adapter"
        write_adapter(stage / adapter_rel, lora, fingerprint, lora_dtype)
    return TaskSpec(task.name, task.kind, task.labels, task.max_length, head_rel, adapter_rel, fingerprint)


def _finish_manifest(stage: Path, m: Manifest) -> Manifest:
    files = {}
    for p in sorted(stage.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(stage).as_posix()] = sha256_file(p)
    m = replace(m, files=files)
    tmp = stage / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    os.replace(tmp, stage / MANIFEST)
    return m


def _swap_into_place(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage``: a reader sees the old bundle or the new one, never a mix.

    Two renames; if the process dies between them, ``out.old-*`` holds the old bundle and
    the next export (or ``recover``) restores or replaces it.
    """
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(out: Path) -> None:
    """Clean what an interrupted export left beside ``out``; restore the old bundle if needed."""
    parent = out.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f"{out.name}.old-*"))
    if not out.exists() and olds:
        os.replace(olds[-1], out)
        olds = olds[:-1]
    for p in olds + sorted(parent.glob(f".{out.name}.staging-*")):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- checks
def _torch_logits(ckpt: Path, tasks: list[CkptTask], token_rows: list[list[int]], special: dict) -> dict:
    """Reference logits from torch + PEFT on the checkpoint, per task."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    out = {}
    for t in tasks:
        base = AutoModel.from_pretrained(ckpt / "backbone", attn_implementation="eager")
        model = PeftModel.from_pretrained(base, ckpt / "adapters" / t.adapter) if t.adapter else base
        model.eval()
        rows = []
        with torch.no_grad():
            for toks in token_rows:
                toks = toks[: t.max_length - 2]
                ids = torch.tensor([[special["cls"], *toks, special["sep"]]])
                h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].numpy()
                if t.kind == "tc":
                    rows.append(h.mean(axis=0) @ t.head_weight.T + t.head_bias)
                else:
                    rows.append(h[1:-1] @ t.head_weight.T + t.head_bias)
        out[t.name] = rows
    return out


def _runtime_logits(bundle: Path, tasks: list[CkptTask], token_rows: list[list[int]]) -> dict:
    from mtpf_runtime import Runtime

    rt = Runtime(bundle)
    out = {}
    for t in tasks:
        rows = [r[: t.max_length - 2] for r in token_rows]
        if t.kind == "tc":
            out[t.name] = list(rt._run_rows(rows, rt.manifest.tasks[t.name], pooled=True))
        else:
            out[t.name] = rt.token_logits(rows, t.name)
    return out


def _calibration_feeds(tokenizer_json: Path, sample_texts: list[str], special: dict,
                       max_positions: int) -> list[dict[str, np.ndarray]]:
    """One feed per sample text (batch 1, no padding): static calibration and sensitivities."""
    feeds = []
    for row in _sample_rows(tokenizer_json, sample_texts):
        ids = np.array([[special["cls"], *row[: max_positions - 2], special["sep"]]], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return feeds


def _trunk_feeds(fp32_full: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(fp32_full.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [{"trunk_hidden": sess.run(["trunk_hidden"], f)[0], "attention_mask": f["attention_mask"]}
            for f in feeds]


def _sample_rows(tokenizer_json: Path, sample_texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return [e.ids for e in tok.encode_batch(sample_texts, add_special_tokens=False)]


# ---------------------------------------------------------------- entry point
def export_bundle(
    ckpt: Path, out: Path, *, precision: str = "int8", scheme: str = DEFAULT_SCHEME,
    tasks: list[str] | None = None, add_to: bool = False, sample_texts: list[str] | None = None,
    ort_format: bool = True, keep_fp32: str = DEFAULT_FP32, embeddings: str = DEFAULT_EMBEDDINGS, log=print,
    slots_for: Sequence[Path] = (), adapter_dtype: str | None = None,
) -> Manifest:
    """Export ``tasks`` of checkpoint ``ckpt`` to bundle ``out``.

    ``add_to``: add (or replace) these tasks in the existing bundle ``out`` without
    rebuilding its backbone; the checkpoint's backbone weights must be the ones the
    bundle was built from.
    ``slots_for``: other checkpoints whose tasks will be added later; the new backbone also
    carries the LoRA slots their adapters use, so those adds need no rebuild.
    INT8 recipe: ``scheme`` (per-channel, per-tensor, static, per-token), ``keep_fp32`` (see
    ``fp32_keep_nodes``), ``embeddings`` (fp32 or int8 per-row word-embedding table).
    ``adapter_dtype``: the adapters' (and the graph's LoRA inputs') type, ``float16`` or
    ``float32``; None: float16 for an INT8 bundle (half the memory per task), float32 for an
    fp32 one (the reference), and with ``add_to`` whatever the bundle has.
    """
    ckpt, out = Path(ckpt), Path(out)
    if precision not in ("int8", "fp32"):
        raise ExportError(f"precision {precision!r}; choose int8 or fp32")
    if scheme not in SCHEMES:
        raise ExportError(f"quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if embeddings not in ("fp32", "int8"):
        raise ExportError(f"embeddings {embeddings!r}; choose fp32 or int8")
    if adapter_dtype is not None and adapter_dtype not in LORA_DTYPES:
        raise ExportError(f"adapter dtype {adapter_dtype!r}; choose from {', '.join(LORA_DTYPES)}")
    recover(out)
    t0 = time.time()
    cfg = json.loads((ckpt / "backbone" / "config.json").read_text()) if (ckpt / "backbone" / "config.json").is_file() else None
    ck_tasks = read_checkpoint_tasks(ckpt, tasks)
    model_type = cfg["model_type"]
    source_sha = sha256_file(ckpt / "backbone" / "model.safetensors")
    loras = {t.name: read_lora(ckpt, t.adapter, model_type) if t.adapter else None for t in ck_tasks}
    samples = SAMPLE_TEXTS + list(sample_texts or [])

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    stage.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by others
    try:
        if add_to:
            base = read_manifest(out, verify=True)
            if adapter_dtype is not None and adapter_dtype != base.lora_dtype:
                raise ExportError(f"{out}: its backbone takes {base.lora_dtype} LoRA inputs, not {adapter_dtype}; "
                                  f"leave the adapter dtype out with --add, or export the whole bundle")
            lora_dtype = base.lora_dtype
            if base.source_sha256 != source_sha:
                raise ExportError(
                    f"{out}: its backbone was built from weights {base.source_sha256[:12]}…, the checkpoint's "
                    f"are {source_sha[:12]}…; export the whole bundle instead of --add")
            have = {(s.layer, s.target) for s in base.lora_slots}
            for name, lora in loras.items():
                extra = sorted(set(lora or {}) - have)
                if extra:
                    raise ExportError(f"task {name!r} needs LoRA slots {extra} the bundle's backbone lacks; "
                                      f"re-export the whole bundle")
            for rel in base.files:  # hard links: the backbone is not rewritten, only linked
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(out / rel, stage / rel)
                except OSError:
                    shutil.copy2(out / rel, stage / rel)
            fingerprint = base.fingerprint
            specs = dict(base.tasks)
            for name in loras:  # a replaced task's old files must not linger
                for rel in (specs.get(name).head, specs.get(name).adapter) if name in specs else ():
                    if rel:
                        (stage / rel).unlink(missing_ok=True)
            m = base
            fp32_model = None
        else:
            slots = {s for lora in loras.values() if lora for s in lora}
            for other in slots_for:
                for t in read_checkpoint_tasks(Path(other)):
                    slots |= set(read_lora(Path(other), t.adapter, model_type)) if t.adapter else set()
            slots = sorted(slots)
            lora_dtype = adapter_dtype or ("float16" if precision == "int8" else "float32")
            # The shared trunk ends where the first adapted layer begins; with an adapter on
            # layer 0 (or none at all) there is nothing to share.
            split = min(layer for layer, _ in slots) if slots else None
            split = split or None
            fp32_model, lora_slots = build_backbone(ckpt / "backbone", slots, split_layer=split, lora_dtype=lora_dtype)
            graphs = {"backbone.onnx": fp32_model}
            if split:
                graphs["top.onnx"] = build_backbone(ckpt / "backbone", slots, part="top", split_layer=split,
                                                    lora_dtype=lora_dtype)[0]
            special = _tokenizer_info(ckpt / "backbone", stage / "tokenizer.json")
            quant = {}
            if precision == "int8":
                n_layers = cfg.get("num_hidden_layers", cfg.get("n_layers"))
                feeds = _calibration_feeds(stage / "tokenizer.json", samples, special, cfg["max_position_embeddings"])
                errors = (matmul_errors(fp32_model, feeds, per_token=scheme == "per-token")
                          if keep_fp32.startswith(("auto:", "auto-any:")) else None)
                keep = fp32_keep_nodes(model_type, n_layers, keep_fp32, errors=errors, split_layer=split)
            for fname, graph in graphs.items():
                if precision != "int8":
                    onnx.save(graph, stage / fname)
                    continue
                calib = None
                if scheme == "static":  # top.onnx calibrates on the trunk states the full graph makes
                    calib = _trunk_feeds(fp32_model, feeds) if fname == "top.onnx" else feeds
                q = quantize_backbone(graph, stage / fname, scheme, keep, embeddings=embeddings, calibration=calib)
                if fname == "backbone.onnx":
                    quant = {**q, "fp32_preset": keep_fp32}
                    if errors is not None:
                        quant["matmul_int8_errors"] = {k: round(v, 6) for k, v in errors.items()}
            mobile = write_ort_format(stage, list(graphs)) if ort_format else {}
            fingerprint = sha256_file(stage / "backbone.onnx")
            specs = {}
            m = Manifest(SCHEMA_VERSION, "backbone.onnx", fingerprint, precision, model_type,
                         fp32_model.graph.output[0].type.tensor_type.shape.dim[2].dim_value,
                         cfg.get("num_hidden_layers", cfg.get("n_layers")),
                         cfg["max_position_embeddings"], special,
                         tuple(LoraSlotSpec(s.layer, s.target, s.in_features, s.out_features) for s in lora_slots),
                         "tokenizer.json", {}, {},
                         source_sha, quant, _producer(), "top.onnx" if split else None, split, mobile,
                         lora_dtype)
        for t in ck_tasks:
            specs[t.name] = _write_task_files(stage, t, loras[t.name], fingerprint, lora_dtype)
        m = _finish_manifest(stage, replace(m, tasks=specs, files={"backbone.onnx": fingerprint},
                                            producer=_producer()))
        log(f"built {precision} bundle with tasks {sorted(specs)} in {time.time() - t0:.1f}s; checking…")

        # ---- self-check: fp32 graph vs torch + PEFT, and INT8 label agreement
        rows = _sample_rows(stage / "tokenizer.json", samples)
        ref = _torch_logits(ckpt, ck_tasks, rows, m.special_ids)
        # The bundle itself is held to torch's logits only when it is the exact reference (fp32
        # graph, float32 adapters); otherwise that reference is built beside it and checked, and
        # the bundle's labels are compared with torch's.
        exact = precision == "fp32" and lora_dtype == "float32"
        if exact:
            fp32_out = _runtime_logits(stage, ck_tasks, rows)
        else:
            check = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-check-", dir=out.parent))
            try:
                if fp32_model is None or lora_dtype != "float32":
                    slots = sorted((s.layer, s.target) for s in m.lora_slots)
                    fp32_model, _ = build_backbone(ckpt / "backbone", slots, split_layer=m.split_layer)
                onnx.save(fp32_model, check / "backbone.onnx")
                fp = sha256_file(check / "backbone.onnx")
                shutil.copy2(stage / "tokenizer.json", check / "tokenizer.json")
                cspecs = {t.name: _write_task_files(check, t, loras[t.name], fp) for t in ck_tasks}
                _finish_manifest(check, replace(m, schema_version=SCHEMA_VERSION, fingerprint=fp, precision="fp32",
                                                tasks=cspecs, files={"backbone.onnx": fp}, quantization={},
                                                top=None, split_layer=None, mobile={}, lora_dtype="float32"))
                fp32_out = _runtime_logits(check, ck_tasks, rows)
            finally:
                shutil.rmtree(check, ignore_errors=True)
            bundle_out = _runtime_logits(stage, ck_tasks, rows)
        for t in ck_tasks:
            diff = max(float(np.abs(a - b).max()) if a.size else 0.0 for a, b in zip(fp32_out[t.name], ref[t.name]))
            checks = {"samples": len(rows), "fp32_max_logit_diff": diff, "tolerance": FP32_PARITY_TOL}
            if diff > FP32_PARITY_TOL:
                raise ExportError(f"task {t.name!r}: exported fp32 logits differ from torch by {diff:.2e} "
                                  f"(> {FP32_PARITY_TOL}); the export is wrong, nothing was written")
            if not exact:
                what = "int8" if precision == "int8" else "fp16_adapter"
                agree = [np.argmax(a, -1) == np.argmax(b, -1) for a, b in zip(bundle_out[t.name], ref[t.name])]
                flat = np.concatenate([np.atleast_1d(x) for x in agree])
                checks[f"{what}_label_agreement"] = float(flat.mean())
                checks[f"{what}_max_logit_diff"] = max(float(np.abs(a - b).max()) if a.size else 0.0
                                                       for a, b in zip(bundle_out[t.name], ref[t.name]))
            specs[t.name] = replace(specs[t.name], checks=checks)
            log(f"  {t.name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in checks.items()))
        m = _finish_manifest(stage, replace(m, tasks=specs))
        read_manifest(stage, verify=True)
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.1f} MB) "
        f"in {time.time() - t0:.1f}s")
    return m
