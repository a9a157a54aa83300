"""Checkpoints with random (non-zero) LoRA and heads, written with PEFT directly.

Independent of mtpf-adapt on purpose: export must read any PEFT LoRA adapter saved in
the checkpoint layout, not only the ones our trainer writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def make_checkpoint(
    base: Path, out: Path, *, tasks: dict[str, dict], seed: int = 0,
) -> Path:
    """``tasks``: name -> {"kind", "labels", "adapter": name|None, "layers": (..), "rank": r,
    "targets": (..), "max_length": n}. Adapters are created once per adapter name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import save_file
    from transformers import AutoModel, AutoTokenizer

    from mtpf_training.arch import DEFAULT_TARGETS, arch_for, peft_target_regex

    if out.exists():
        shutil.rmtree(out)
    (out / "tasks").mkdir(parents=True)
    (out / "heads").mkdir()
    model = AutoModel.from_pretrained(base)
    model.save_pretrained(out / "backbone")
    AutoTokenizer.from_pretrained(base).save_pretrained(out / "backbone")
    arch = arch_for(model.config.model_type)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.dim
    rng = np.random.default_rng(seed)
    made = set()
    for i, (name, t) in enumerate(tasks.items()):
        adapter = t.get("adapter")
        if adapter and adapter not in made:
            torch.manual_seed(seed + i)
            cfg = LoraConfig(r=t.get("rank", 8), lora_alpha=t.get("alpha", 16),
                             target_modules=peft_target_regex(arch, tuple(t.get("layers", (0,))),
                                                              tuple(t.get("targets", DEFAULT_TARGETS))))
            pm = get_peft_model(AutoModel.from_pretrained(base), cfg)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:  # PEFT starts B at zero: a no-op adapter would test nothing
                        p.normal_(std=0.05)
            pm.save_pretrained(out / "adapters" / adapter)
            made.add(adapter)
        labels = list(t["labels"])
        save_file({"weight": rng.normal(size=(len(labels), hidden)).astype(np.float32),
                   "bias": rng.normal(size=len(labels)).astype(np.float32)},
                  str(out / "heads" / f"{name}.safetensors"))
        (out / "tasks" / f"{name}.json").write_text(json.dumps(
            {"name": name, "kind": t["kind"], "labels": labels, "adapter": adapter,
             "max_length": t.get("max_length", 64)}))
    return out


def ort_format_token_logits(bundle: Path, task: str, row: list[int]) -> np.ndarray:
    """An NER task's token logits for one tokenised row through ``mobile/backbone.ort``, the
    task's ``.onnx_adapter`` and its npz head, with ONNX Runtime alone (no mtpf code in the
    path): what an app on a phone runs."""
    import onnxruntime as ort

    m = json.loads((bundle / "manifest.json").read_text())
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle / m["mobile"]["backbone"]), opts, providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(bundle / m["tasks"][task]["adapter"]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    with np.load(bundle / m["tasks"][task]["head"], allow_pickle=False) as z:
        w, b = z["weight"], z["bias"]
    special = m["tokenizer"]["special_ids"]
    ids = np.array([[special["cls"], *row, special["sep"]]], np.int64)
    hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}, run_options)[0]
    return hidden[0, 1:-1] @ w.T + b
