"""The alternatives to an mtpf bundle, and the demo setup the benchmark builds for itself.

* ``build_merged_bundle``: one task's PEFT LoRA merged into the backbone weights
  (``W + scaling * B @ A``), the graph rebuilt from the merged weights with no LoRA slots,
  quantized like the real bundle, and packed as a one-task bundle whose task has no adapter.
  The ``Runtime`` then serves it with exactly the code that serves an mtpf bundle (same
  tokenizer, padding, head in numpy, decoding), so a benchmark that compares the two compares
  the models and nothing else. K features shipped this way = K such bundles = K sessions.
* ``MergedSet``: K merged bundles = K ``Runtime`` sessions behind one classify/tag interface.
* ``torch_peft_class()``: PyTorch + PEFT (fp32, every adapter loaded, ``set_adapter`` per
  request) behind the ``Runtime``'s own tokenizing and decoding; built lazily (imports torch).
* ``make_demo_checkpoint``: a checkpoint of the real MiniLM with random LoRA adapters and
  heads, for a benchmark run without a trained bundle. A random adapter has exactly the shapes,
  and therefore the compute and memory cost, of a trained one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mtpf_runtime.manifest import MANIFEST, SCHEMA_VERSION, Manifest, TaskSpec, read_manifest, sha256_file

# The paper's placement (DESIGN.md): last 2 layers, q/k/FFN-in/FFN-out, rank 32, alpha 64.
DEMO_RANK, DEMO_ALPHA, DEMO_LAST_LAYERS = 32, 64, 2
DEMO_NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
DEMO_TC_LABELS = ["world", "sports", "business", "science"]


# ---------------------------------------------------------------- merging
def merge_lora(weights: dict[str, np.ndarray], lora: dict, model_type: str) -> dict[str, np.ndarray]:
    """Backbone weights with every LoRA slot folded in.

    ``lora`` is ``export.bundle.read_lora``'s output: ``{(layer, target): (A^T [in, r],
    (scaling * B)^T [r, out])}``. A linear layer computes ``x @ W^T``; LoRA adds
    ``x @ A^T @ (sB)^T``, so the merged torch-layout weight is ``W + (A^T @ (sB)^T)^T``.
    """
    from mtpf_training.arch import arch_for

    arch = arch_for(model_type)
    out = dict(weights)
    for (layer, target), (a_t, sb_t) in lora.items():
        key = f"{arch.layers}.{layer}.{arch.modules[target]}.weight"
        if key not in out:
            raise KeyError(f"LoRA slot ({layer}, {target!r}) has no backbone weight {key!r}")
        delta = (a_t.astype(np.float64) @ sb_t.astype(np.float64)).T  # (out, in), torch layout
        if delta.shape != out[key].shape:
            raise ValueError(f"{key}: LoRA delta {delta.shape} does not match the weight {out[key].shape}")
        out[key] = (out[key].astype(np.float64) + delta).astype(np.float32)
    return out


def build_merged_bundle(ckpt: Path, task: str, out: Path, *, precision: str = "int8",
                        scheme: str | None = None, keep_fp32: list[str] | None = None,
                        embeddings: str = "int8") -> Path:
    """A one-task bundle whose backbone has ``task``'s adapter merged in (no LoRA inputs).

    ``scheme`` (None: the export default), ``keep_fp32`` (MatMul node names; None: the export default) and ``embeddings``
    should be the mtpf bundle's own recipe (its manifest's ``quantization``), so the two are
    quantized alike.
    """
    from safetensors.numpy import save_file

    from mtpf_export.bundle import (
        DEFAULT_FP32, SAMPLE_TEXTS, _calibration_feeds, _tokenizer_info, fp32_keep_nodes, read_checkpoint_tasks,
        read_lora,
    )
    from mtpf_export.graph import build_backbone, load_weights
    from mtpf_export.quantize import DEFAULT_SCHEME, matmul_errors, quantize_backbone

    scheme = scheme or DEFAULT_SCHEME

    ckpt, out = Path(ckpt), Path(out)
    (t,) = read_checkpoint_tasks(ckpt, [task])
    cfg = json.loads((ckpt / "backbone" / "config.json").read_text())
    weights = load_weights(ckpt / "backbone")
    if t.adapter:
        weights = merge_lora(weights, read_lora(ckpt, t.adapter, cfg["model_type"]), cfg["model_type"])
    if out.exists():
        shutil.rmtree(out)
    (out / "heads").mkdir(parents=True)
    special = _tokenizer_info(ckpt / "backbone", out / "tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="mtpf-merged-") as tmp:
        bdir = Path(tmp)
        save_file(weights, str(bdir / "model.safetensors"))
        shutil.copy2(ckpt / "backbone" / "config.json", bdir / "config.json")
        model, slots = build_backbone(bdir, [])
        assert not slots
        if precision == "int8":
            # The same recipe as the mtpf export, so the comparison is like for like.
            feeds = _calibration_feeds(ckpt / "backbone" / "tokenizer.json", SAMPLE_TEXTS,
                                       special, int(cfg["max_position_embeddings"]))
            keep = keep_fp32
            if keep is None:  # no bundle to copy from: the export default, measured on this model
                errors = (matmul_errors(model, feeds, per_token=scheme == "per-token")
                          if DEFAULT_FP32.startswith("auto:") else None)
                keep = fp32_keep_nodes(cfg["model_type"], int(cfg.get("num_hidden_layers", cfg.get("n_layers"))),
                                       DEFAULT_FP32, errors=errors)
            calib = feeds if scheme == "static" else None
            quant = quantize_backbone(model, out / "backbone.onnx", scheme, keep, embeddings=embeddings,
                                      calibration=calib)
        elif precision == "fp32":
            import onnx

            onnx.save(model, out / "backbone.onnx")
            quant = {}
        else:
            raise ValueError(f"precision {precision!r}; choose int8 or fp32")
    np.savez(out / "heads" / f"{t.name}.npz", weight=t.head_weight, bias=t.head_bias)
    fingerprint = sha256_file(out / "backbone.onnx")
    spec = TaskSpec(t.name, t.kind, t.labels, t.max_length, f"heads/{t.name}.npz", None, fingerprint,
                    {"merged_adapter": t.adapter})
    files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    m = Manifest(SCHEMA_VERSION, "backbone.onnx", fingerprint, precision, cfg["model_type"],
                 int(cfg.get("hidden_size", cfg.get("dim"))), int(cfg.get("num_hidden_layers", cfg.get("n_layers"))),
                 int(cfg["max_position_embeddings"]), special, (), "tokenizer.json", {t.name: spec}, files,
                 sha256_file(ckpt / "backbone" / "model.safetensors"), quant, {"mtpf_benchmarks": "merged"})
    (out / MANIFEST).write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    read_manifest(out, verify=True)
    return out


# ---------------------------------------------------------------- the alternatives as engines
class MergedSet:
    """One ``Runtime`` per merged one-task bundle: K features = K sessions."""

    def __init__(self, bundles: dict[str, str], threads: int, batch_size: int = 32) -> None:
        from mtpf_runtime import Runtime

        self.rts = {task: Runtime(path, threads=threads, batch_size=batch_size) for task, path in bundles.items()}

    def classify(self, texts, task):
        return self.rts[task].classify(texts, task)

    def tag(self, texts, task):
        return self.rts[task].tag(texts, task)




def torch_peft_class() -> type:
    """``TorchPeft``, built on first use so that importing this module stays torch-free."""
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from mtpf_runtime import Runtime
    from mtpf_runtime.manifest import read_manifest, resolve_file

    class TorchPeft(Runtime):
        """PyTorch + PEFT behind the Runtime's own tokenizing and decoding code.

        Only ``_run_rows`` differs: the backbone is the fp32 torch model with every task's
        adapter loaded, and ``set_adapter`` picks one per request (PEFT's multi-adapter API).
        """

        def __init__(self, bundle: str, ckpt: str, threads: int, tasks: list[str], batch_size: int = 32) -> None:
            import dataclasses

            torch.set_num_threads(threads)
            self.path, ckpt_p = Path(bundle), Path(ckpt)
            m = read_manifest(self.path, verify=False)
            self.manifest = dataclasses.replace(m, tasks={n: m.tasks[n] for n in tasks})
            self.batch_size = batch_size
            self._heads = {n: self._load_head(s) for n, s in self.manifest.tasks.items()}
            self._tok = Tokenizer.from_file(str(resolve_file(self.path, m.tokenizer)))
            self._tok.no_padding()
            self._tok.no_truncation()
            self._adapters = {n: json.loads((ckpt_p / "tasks" / f"{n}.json").read_text()).get("adapter")
                              for n in tasks}
            model = AutoModel.from_pretrained(ckpt_p / "backbone")
            names = sorted({a for a in self._adapters.values() if a})
            if names:
                model = PeftModel.from_pretrained(model, ckpt_p / "adapters" / names[0], adapter_name=names[0])
                for a in names[1:]:
                    model.load_adapter(ckpt_p / "adapters" / a, adapter_name=a)
            self._model = model.eval()

        def _run_rows(self, rows, spec, pooled):  # noqa: ANN001
            import contextlib

            ids = self.manifest.special_ids
            head, adapter = self._heads[spec.name], self._adapters[spec.name]
            order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
            out: list = [None] * len(rows)
            for b0 in range(0, len(order), self.batch_size):
                chunk = order[b0: b0 + self.batch_size]
                width = max(len(rows[i]) for i in chunk) + 2
                input_ids = np.full((len(chunk), width), ids["pad"], np.int64)
                mask = np.zeros((len(chunk), width), np.int64)
                for r, i in enumerate(chunk):
                    input_ids[r, : len(rows[i]) + 2] = [ids["cls"], *rows[i], ids["sep"]]
                    mask[r, : len(rows[i]) + 2] = 1
                ctx = contextlib.nullcontext()
                if adapter:
                    self._model.set_adapter(adapter)
                elif isinstance(self._model, PeftModel):
                    ctx = self._model.disable_adapter()
                with torch.inference_mode(), ctx:
                    hidden = self._model(input_ids=torch.from_numpy(input_ids),
                                         attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
                if pooled:
                    m = mask[..., None].astype(np.float32)
                    logits = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0) @ head.weight.T + head.bias
                    for r, i in enumerate(chunk):
                        out[i] = logits[r]
                else:
                    logits = hidden @ head.weight.T + head.bias
                    for r, i in enumerate(chunk):
                        out[i] = logits[r, 1: len(rows[i]) + 1]
            return out

    return TorchPeft




# ---------------------------------------------------------------- demo setup
def demo_tasks(n_ner: int = 4, n_tc: int = 4, max_length: int = 512) -> dict[str, dict]:
    """Task specs for ``make_demo_checkpoint``: one adapter of its own per task."""
    tasks = {}
    for i in range(max(n_ner, n_tc)):
        if i < n_tc:
            tasks[f"tc{i}"] = {"kind": "tc", "labels": DEMO_TC_LABELS, "adapter": f"tc{i}", "max_length": max_length}
        if i < n_ner:
            tasks[f"ner{i}"] = {"kind": "ner", "labels": DEMO_NER_LABELS, "adapter": f"ner{i}",
                                "max_length": max_length}
    return tasks


def make_demo_checkpoint(base: Path, out: Path, tasks: dict[str, dict], *, seed: int = 0) -> Path:
    """A checkpoint of ``base`` with random non-zero LoRA adapters and random heads.

    Same layout as mtpf-adapt writes (backbone/, adapters/<name>/, heads/, tasks/), written
    with PEFT directly. ``tasks``: name -> {"kind", "labels", "adapter", "max_length"} (+
    optional "rank", "alpha", "layers", "targets"); LoRA defaults follow DESIGN.md.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import save_file
    from transformers import AutoModel, AutoTokenizer

    from mtpf_training.arch import DEFAULT_TARGETS, arch_for, peft_target_regex, resolve_layers

    base, out = Path(base), Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "tasks").mkdir(parents=True)
    (out / "heads").mkdir()
    model = AutoModel.from_pretrained(base)
    model.save_pretrained(out / "backbone")
    AutoTokenizer.from_pretrained(base).save_pretrained(out / "backbone")
    cfg = model.config
    arch = arch_for(cfg.model_type)
    hidden = getattr(cfg, "hidden_size", None) or cfg.dim
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layers
    rng = np.random.default_rng(seed)
    made: set[str] = set()
    for i, (name, t) in enumerate(tasks.items()):
        adapter = t.get("adapter")
        if adapter and adapter not in made:
            torch.manual_seed(seed + i)
            layers = tuple(t.get("layers", resolve_layers(DEMO_LAST_LAYERS, n_layers)))
            lcfg = LoraConfig(r=t.get("rank", DEMO_RANK), lora_alpha=t.get("alpha", DEMO_ALPHA),
                              target_modules=peft_target_regex(arch, layers, tuple(t.get("targets", DEFAULT_TARGETS))))
            pm = get_peft_model(AutoModel.from_pretrained(base), lcfg)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:  # PEFT starts B at zero; a zero adapter would still cost the same
                        p.normal_(std=0.02)
            pm.save_pretrained(out / "adapters" / adapter)
            made.add(adapter)
        labels = list(t["labels"])
        save_file({"weight": (rng.normal(size=(len(labels), hidden)) * 0.1).astype(np.float32),
                   "bias": np.zeros(len(labels), np.float32)},
                  str(out / "heads" / f"{name}.safetensors"))
        (out / "tasks" / f"{name}.json").write_text(json.dumps(
            {"name": name, "kind": t["kind"], "labels": labels, "adapter": adapter,
             "max_length": int(t.get("max_length", 128))}))
    (out / "config.json").write_text(json.dumps({"benchmark_demo": True, "base": str(base), "seed": seed,
                                                 "tasks": tasks}, indent=2, default=list))
    return out
