"""The pre-finetuning losses: pure functions from tensors to a scalar.

* :func:`mean_pool`: sentence embedding = attention-masked mean of the token states (the
  pooling the TC probe and the runtime use downstream).
* :func:`info_nce`: contrastive TC objective with in-batch negatives (same-class rows masked).
* :func:`cluster_ce`: NER distillation objective, cross-entropy against teacher cluster ids.
* :func:`embedding_drift`: 1 - cosine between sentence embeddings and fixed targets (the NER
  steps' anchor on the TC view).
* :func:`similarity_distill`: KL from a sentence teacher's in-batch similarity distribution to
  the student's (TC distillation; teacher and student may differ in width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``mask`` is 1; a row with no tokens pools to zero."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, H)
    count = m.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return summed / count  # (B, H)


def info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, temperature: float = 0.05, symmetric: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives (MultipleNegativesRankingLoss).

    Row i of ``anchor`` must pick row i of ``positive`` among all B rows of ``positive``;
    the other B-1 rows are its negatives. Similarity = cosine / ``temperature``: with
    τ = 0.05 a cosine gap of 0.1 becomes a logit gap of 2 (SimCSE's value; a larger τ
    gives softer, less discriminative targets). ``symmetric`` averages the loss with the
    transposed direction (each positive must also pick its anchor).

    ``groups`` (B,) marks rows that share a class: pair j is not a negative of anchor i when
    ``groups[i] == groups[j] >= 0`` (supervised contrastive pairs; -1 = no class, every other
    row is a negative).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must both be (B, H)")
    a = F.normalize(anchor.float(), dim=-1)  # (B, H)
    p = F.normalize(positive.float(), dim=-1)  # (B, H)
    logits = a @ p.T / temperature  # (B, B): row i = anchor i against every positive
    target = torch.arange(a.shape[0], device=a.device)  # (B,): the diagonal
    if groups is not None:
        if groups.shape != (a.shape[0],):
            raise ValueError(f"groups {tuple(groups.shape)} must be ({a.shape[0]},)")
        same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)  # (B, B)
        same.fill_diagonal_(False)  # the partner stays the target
        logits = logits.masked_fill(same, float("-inf"))  # symmetric mask: fine for logits.T too
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


def cluster_ce(logits: torch.Tensor, cluster_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of per-token cluster logits against teacher cluster ids.

    ``cluster_ids`` holds a word's cluster on its first sub-token and ``ignore_index``
    on every other position (continuation pieces, special tokens, padding, truncated
    or unlabelled words). Mean over the labelled positions; 0 if there are none.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # (B*T, K)
    flat_ids = cluster_ids.reshape(-1)  # (B*T,)
    if not bool((flat_ids != ignore_index).any()):
        return flat_logits.sum() * 0.0  # keeps the graph (DDP, backward) without NaN
    return F.cross_entropy(flat_logits, flat_ids, ignore_index=ignore_index)


def embedding_drift(pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cosine(``pooled``, ``target``), both (B, H); 0 when they point alike.

    Cosine, not distance, because the TC objective and probe see directions: a rescaled
    embedding has not drifted. Gradients reach ``pooled`` only.
    """
    if pooled.shape != target.shape or pooled.dim() != 2:
        raise ValueError(f"pooled {tuple(pooled.shape)} and target {tuple(target.shape)} must both be (B, H)")
    return (1.0 - F.cosine_similarity(pooled.float(), target.detach().float(), dim=-1)).mean()


def similarity_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """KL(teacher || student) between in-batch neighbour distributions, mean over rows.

    Row i's distribution is the softmax over the other N-1 rows of cosine(i, j) / ``temperature``,
    for the student's (N, H) embeddings and the teacher's (N, D) ones. Only the relations between
    the texts are matched, so H and D may differ and no projection is learned. 0 when the two
    geometries agree up to the softmax; gradients reach ``student`` only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be (N, H) "
                         "and (N, D) with the same N")
    n = student.shape[0]
    if n < 3:
        raise ValueError(f"similarity distillation needs at least 3 texts (2 neighbours per row), got {n}")
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)  # (N, N): every pair but i with itself
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    s_logits = (s @ s.T)[off].view(n, n - 1) / temperature  # (N, N-1)
    t_logits = (t @ t.T)[off].view(n, n - 1) / temperature  # (N, N-1)
    return F.kl_div(F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1),
                    reduction="batchmean", log_target=True)
