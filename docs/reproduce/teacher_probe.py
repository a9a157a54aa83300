"""How far ahead of the student a TC teacher is: a linear probe on both models' embeddings.

For each TC set: 500 training texts (seeded shuffle, seed 0), at most 1,500 test texts; each
model's mean-pooled, unit-norm embeddings (max length 128); logistic regression (C = 10). This
is the room `--tc-teacher` distillation can take (docs/pretraining.md).

    python docs/reproduce/teacher_probe.py /work/models/all-mpnet-base-v2 sst2,trec
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

from mtpf_training.checkpoint import resolve_base_model
from mtpf_training.data import load_dataset


def embed(path: str, texts: list[str]) -> np.ndarray:
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            b = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h, m = model(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    teacher, sets = sys.argv[1], sys.argv[2].split(",")
    models = {"student (all-MiniLM-L6-v2)": str(resolve_base_model("minilm")), "teacher": teacher}
    for name in sets:
        ds = load_dataset(name)
        train = list(ds.train)
        random.Random(0).shuffle(train)
        train, test = train[:500], list(ds.test)[:1500]
        row = [name]
        for label, path in models.items():
            t0 = time.time()
            x = embed(path, [e.text for e in train] + [e.text for e in test])
            clf = LogisticRegression(max_iter=2000, C=10).fit(x[:len(train)], [e.label for e in train])
            acc = clf.score(x[len(train):], [e.label for e in test])
            row.append(f"{label} {100 * acc:.1f} ({time.time() - t0:.0f} s)")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
