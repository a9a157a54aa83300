"""Pure stages between token ids and caller-visible results (numpy only, no session).

prepare (windows) -> [the backbone runs elsewhere] -> heads -> decode -> map to the caller's text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Entity:
    """One tagged span: ``text[start:end] == entity.text`` for the caller's original string."""

    label: str
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so that the scores of one row sum to 1."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def windows(n_tokens: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of at most ``size`` covering ``0..n_tokens``.

    Consecutive windows overlap by ``size - stride`` tokens so that every token is seen
    with context on both sides in at least one window.
    """
    if n_tokens <= size:
        return [(0, n_tokens)]
    out, start = [], 0
    while True:
        end = min(start + size, n_tokens)
        out.append((start, end))
        if end == n_tokens:
            return out
        start += stride


def best_window(pos: int, spans: list[tuple[int, int]]) -> int:
    """The window in which token ``pos`` has the most context on its nearer side.

    Windows from :func:`windows` start at multiples of one stride, so only the two or three
    windows around ``pos // stride`` can hold it: constant time per token, which keeps a
    1 MB text linear rather than quadratic.
    """
    stride = spans[1][0] - spans[0][0] if len(spans) > 1 else 1
    hi = min(len(spans) - 1, pos // stride)
    best, best_margin = hi, -1
    for i in range(hi, -1, -1):
        s, e = spans[i]
        if e <= pos:
            break
        margin = min(pos - s, e - 1 - pos)
        if margin >= best_margin:  # ties go to the earlier window, as a left-to-right scan would
            best, best_margin = i, margin
    return best


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over the sequence: [batch, seq, hidden] -> [batch, hidden]."""
    m = mask[..., None].astype(np.float32)  # (batch, seq, 1)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)


def decode_bio(
    word_tags: list[str], word_scores: list[float], word_spans: list[tuple[int, int]], text: str
) -> list[Entity]:
    """BIO tags per word -> entities with character offsets into ``text``.

    A stray ``I-X`` (after ``O`` or another type) opens a new entity rather than being
    dropped: the model saw the type, and losing it silently is worse than a loose start.
    """
    entities: list[Entity] = []
    cur: list[int] = []
    cur_type = ""

    def close() -> None:
        if cur:
            start, end = word_spans[cur[0]][0], word_spans[cur[-1]][1]
            score = sum(word_scores[i] for i in cur) / len(cur)
            entities.append(Entity(cur_type, start, end, text[start:end], score))
            cur.clear()

    for i, tag in enumerate(word_tags):
        if tag == "O":
            close()
            continue
        prefix, etype = tag[0], tag[2:]
        if prefix == "B" or etype != cur_type or not cur:
            close()
            cur_type = etype
        cur.append(i)
    close()
    return entities
