"""How much of one NER update's change to the TC view's sentence embeddings the projection removes,
by conjugate-gradient iterations and finite-difference step (docs/pretraining.md, the
``--ner-projection-iterations`` decisions). CPU, a few minutes; the packaged MiniLM, no data.

The update is AdamW's first step on the NER head's loss against random cluster ids: learning
rate x sign(gradient) on every backbone weight. "real" is the change of the pooled embeddings
when the projected update is applied (not its first-order estimate).

    python docs/reproduce/projection_step.py
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from mtpf_training import checkpoint as ck
from mtpf_training.losses import cluster_ce, mean_pool
from mtpf_training.pretrain import PretrainConfig, backbone_parameters, build_student
from mtpf_training.projection import project_update

TEXTS = ["Apple bought a startup in London for one billion dollars on Monday.",
         "The patient was given aspirin for the headache.",
         "Barack Obama met Angela Merkel in Berlin.",
         "lol cant believe @justin is in toronto tonight",
         "The quick brown fox jumps over the lazy dog.",
         "Shares of Siemens fell 3 percent in Frankfurt trading."] * 5
LR = 2e-5


def main() -> None:
    torch.manual_seed(0)
    student, tok, _ = build_student(ck.resolve_base_model("minilm"), PretrainConfig(mode="tpl"))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student.train()
    logits = student(ids, mask, task="ner")
    cluster_ce(logits, torch.randint(0, logits.shape[-1], ids.shape)).backward()
    params = backbone_parameters(student)
    theta = {n: p.detach().clone() for n, p in params.items()}
    delta = {n: -LR * torch.sign(p.grad) if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    student.activate("tc")
    student.encoder.eval()

    def tc_view(ps):
        out = functional_call(student.encoder, ps, args=(), kwargs={"input_ids": ids, "attention_mask": mask},
                              strict=False)
        return mean_pool(out.last_hidden_state, mask)

    with torch.no_grad():
        e0 = tc_view(theta)

    @torch.no_grad()
    def real(d):
        return float((tc_view({n: theta[n] + d[n] for n in d}) - e0).norm())

    unprojected = real(delta)
    size = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
    weights = float(torch.sqrt(sum((t.double() ** 2).sum() for t in theta.values())))
    print(f"update norm {size:.4f}, weights norm {weights:.1f}, real change unprojected {unprojected:.4f}")
    print("fd step | K | first-order left | real change left | removed")
    for label, step in (("update norm", None), ("1e-3 x weights", 1e-3 * weights)):
        for k in (1, 2, 4, 8):
            projected, stats = project_update(tc_view, theta, delta, k, fd_step=step)
            left = real(projected)
            print(f"{label} | {k} | {stats['drift_after'] / stats['drift_before']:.2f} | {left:.4f} | "
                  f"{1 - left / unprojected:.0%}")


if __name__ == "__main__":
    main()
