"""How far pre-finetuning moved the pooled sentence embeddings: ``python -m mtpf_training.drift``.

For a set of texts, each checkpoint (optionally with one of its adapters active) is compared
with a reference encoder on the embedding the TC probe sees (attention-masked mean of the last
hidden state):

* ``cos``: cosine between a text's two embeddings (1.0 = unchanged direction);
* ``sim_corr``: correlation of the two texts-by-texts cosine matrices (1.0 = the same
  neighbourhood structure, even if every vector was rotated).

docs/results.md uses it to show that NER distillation, not the TC loss, is what moves the
geometry the probes read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def check_spec(spec: str) -> None:
    """Refuse a ``CKPT[:ADAPTER]`` that names no checkpoint or adapter, before any work."""
    from mtpf_training import checkpoint as ck

    path, _, adapter = spec.partition(":")
    if path == "minilm" and not adapter:
        return
    ck.read_config(path)
    if adapter:
        ck.resolve_adapter_dir(path, adapter)


def embed(spec: str, texts: Sequence[str]) -> np.ndarray:
    """Unit-norm pooled embeddings for ``CKPT`` / ``CKPT:ADAPTER`` / ``minilm`` (the base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from mtpf_training import checkpoint as ck
    from mtpf_training.adapt import pooled_embeddings

    path, _, adapter = spec.partition(":")
    folder = ck.resolve_base_model(path) if path == "minilm" else Path(path) / "backbone"
    model = AutoModel.from_pretrained(folder)
    if adapter:
        model = PeftModel.from_pretrained(model, ck.resolve_adapter_dir(path, adapter))
    with torch.inference_mode():
        e = pooled_embeddings(model, AutoTokenizer.from_pretrained(folder), list(texts))
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def drift(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """``cos`` (mean and min over texts) and ``sim_corr`` of two unit-norm (n, H) embeddings."""
    if reference.shape[0] != other.shape[0] or reference.shape[0] < 2:
        raise ValueError(f"need the same >= 2 texts on both sides, got {reference.shape} and {other.shape}")
    cos = (reference * other).sum(axis=1)
    iu = np.triu_indices(reference.shape[0], k=1)
    corr = np.corrcoef((reference @ reference.T)[iu], (other @ other.T)[iu])[0, 1]
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sim_corr": float(corr)}


def main(argv: Sequence[str] | None = None) -> int:
    from mtpf_training.data import load_dataset

    p = argparse.ArgumentParser(prog="python -m mtpf_training.drift", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT[:ADAPTER]")
    p.add_argument("--reference", default="minilm", help="encoder to compare against (default: minilm)")
    p.add_argument("--datasets", default="sst2,ag_news", help="TC sets whose first test texts are used")
    p.add_argument("--n", type=int, default=150, help="texts per dataset (default: 150)")
    args = p.parse_args(argv)
    try:
        for spec in (args.reference, *args.checkpoints):
            check_spec(spec)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    texts = [ex.text for name in args.datasets.split(",") for ex in load_dataset(name.strip()).test[:args.n]]
    ref = embed(args.reference, texts)
    for spec in args.checkpoints:
        print(json.dumps({"checkpoint": spec, "texts": len(texts), **drift(ref, embed(spec, texts))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
