"""``Runtime``: one ONNX Runtime session for the backbone, every task adapter loaded once.

The adapter is chosen per call through a fresh ``RunOptions`` (ONNX Runtime's own
multi-LoRA API), so there is no "current adapter" that one thread could change under
another. All per-task state is a dict keyed by task name and never mutated after load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from .decode import Classification, Entity, best_window, decode_bio, mean_pool, softmax, windows
from .errors import BundleError, FingerprintError, InputError, TaskKindError, UnknownTaskError
from .manifest import Manifest, TaskSpec, adapter_model_version, read_manifest, resolve_file

# Lone surrogates cannot cross into the Rust tokenizer; replacing each by one U+FFFD keeps
# every character offset valid for the caller's original string.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "ner" | "tc"
    labels: tuple[str, ...]  # class names (tc) or entity types (ner)


@dataclass(frozen=True)
class _Head:
    weight: np.ndarray  # (labels, hidden)
    bias: np.ndarray  # (labels,)


class Runtime:
    """Serve every task of a bundle from one backbone session.

    ``threads``: intra-op threads of the session (None: ONNX Runtime's default, all cores).
    ``verify``: check every file's sha256 against the manifest before loading anything.
    ``batch_size``: texts per backbone run; lists are sorted by length and padded per batch.
    """

    def __init__(self, bundle: str | os.PathLike, threads: int | None = None, *,
                 verify: bool = True, batch_size: int = 32) -> None:
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        m = self.manifest
        self._heads: dict[str, _Head] = {}
        self._adapters: dict[str, ort.LoraAdapter | None] = {}
        slot_shapes = {f"lora.{s.layer}.{s.target}": (s.in_features, s.out_features) for s in m.lora_slots}
        for name, spec in m.tasks.items():
            if spec.backbone_fingerprint != m.fingerprint:
                raise FingerprintError(
                    f"task {name!r} was exported for backbone {spec.backbone_fingerprint[:12]}…, "
                    f"but this bundle's backbone is {m.fingerprint[:12]}…; re-export the task against it")
            self._heads[name] = self._load_head(spec)
            self._adapters[name] = self._load_adapter(spec, slot_shapes) if spec.adapter else None

        tok_path = resolve_file(self.path, m.tokenizer)
        try:
            self._tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise BundleError(f"{tok_path}: not a readable tokenizers file ({e})") from None
        self._tok.no_padding()
        self._tok.no_truncation()

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the LoRA inputs' default-initializer warning is expected
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        backbone = resolve_file(self.path, m.backbone)
        try:
            self._session = ort.InferenceSession(str(backbone), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"{backbone}: ONNX Runtime cannot load it ({e})") from None

    # ---------------------------------------------------------------- loading
    def _load_head(self, spec: TaskSpec) -> _Head:
        path = resolve_file(self.path, spec.head)
        try:
            with np.load(path, allow_pickle=False) as z:
                w, b = np.asarray(z["weight"], np.float32), np.asarray(z["bias"], np.float32)
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{path}: not a head file with float arrays 'weight' and 'bias' ({e})") from None
        want = (len(spec.labels), self.manifest.hidden_size)
        if w.shape != want or b.shape != want[:1]:
            raise BundleError(f"{path}: head shapes {w.shape}/{b.shape}; task {spec.name!r} needs "
                              f"weight {want} and bias {want[:1]}")
        return _Head(w, b)

    def _load_adapter(self, spec: TaskSpec, slot_shapes: dict[str, tuple[int, int]]) -> ort.LoraAdapter:
        assert spec.adapter is not None
        path = resolve_file(self.path, spec.adapter)
        # Validate before activating: names, shapes and the backbone it was made for.
        try:
            fmt = ort.AdapterFormat.read_adapter(str(path))
            params = fmt.get_parameters()
        except Exception as e:
            raise BundleError(f"{path}: not an ONNX Runtime adapter file ({e})") from None
        if fmt.get_model_version() != adapter_model_version(self.manifest.fingerprint):
            raise FingerprintError(f"{path}: adapter made for another backbone (model_version "
                                   f"{fmt.get_model_version()}, this backbone expects "
                                   f"{adapter_model_version(self.manifest.fingerprint)})")
        for pname, value in params.items():
            slot, _, which = pname.rpartition(".")
            if slot not in slot_shapes or which not in ("A", "B"):
                raise BundleError(f"{path}: parameter {pname!r} is not a LoRA input of the backbone "
                                  f"(known slots: {sorted(slot_shapes)})")
            shape = tuple(value.shape())
            fin, fout = slot_shapes[slot]
            ok = (len(shape) == 2 and (shape[0] == fin if which == "A" else shape[1] == fout)
                  and 0 < (shape[1] if which == "A" else shape[0]) <= min(fin, fout))
            if not ok:
                raise BundleError(f"{path}: {pname} has shape {shape}; expected "
                                  f"{'[%d, rank]' % fin if which == 'A' else '[rank, %d]' % fout}")
        del params, fmt
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter

    # ---------------------------------------------------------------- public API
    @property
    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo(n, t.kind, t.entity_types if t.kind == "ner" else t.labels)
                for n, t in sorted(self.manifest.tasks.items())]

    def classify(self, texts: str | Sequence[str], task: str) -> Classification | list[Classification]:
        """Label, its score and every label's score; softmax scores sum to 1.

        Texts longer than the task's max length are classified on their first
        ``max_length`` tokens (a document classifier sees the head of the text). Empty or
        whitespace-only text is classified as the empty sequence ``[CLS] [SEP]``.
        """
        single, batch = _as_batch(texts)
        spec = self._spec(task, "tc")
        logits = self.logits(batch, task)
        out = []
        for row in logits:
            p = softmax(row)
            i = int(p.argmax())
            out.append(Classification(spec.labels[i], float(p[i]),
                                      {lab: float(v) for lab, v in zip(spec.labels, p)}))
        return out[0] if single else out

    def tag(self, texts: str | Sequence[str], task: str) -> list[Entity] | list[list[Entity]]:
        """Entities with label, score and character offsets into each original string.

        Long texts are tagged in overlapping windows of the task's max length and merged:
        each word takes the prediction of the window where it has most context. Empty or
        whitespace-only text has no entities (``[]``).
        """
        single, batch = _as_batch(texts)
        spec = self._spec(task, "ner")
        clean = [_SURROGATE.sub("\ufffd", t) for t in batch]
        encs = self._tok.encode_batch(clean, add_special_tokens=False)
        size = spec.max_length - 2
        stride = max(1, size // 2)
        # prepare: one row per window
        rows: list[list[int]] = []
        owners: list[tuple[int, int]] = []  # (text index, window start)
        spans_per_text: list[list[tuple[int, int]]] = []
        for ti, enc in enumerate(encs):
            spans = windows(len(enc.ids), size, stride) if enc.ids else []
            spans_per_text.append(spans)
            for s, e in spans:
                rows.append(enc.ids[s:e])
                owners.append((ti, s))
        probs_rows = [softmax(x) for x in self._run_rows(rows, spec, pooled=False)]
        by_text: dict[int, list[np.ndarray]] = {}
        for (ti, _), p in zip(owners, probs_rows):
            by_text.setdefault(ti, []).append(p)
        # decode: per word, the first sub-token in its best window
        results = []
        for ti, (text, enc) in enumerate(zip(batch, encs)):
            results.append(self._decode_words(text, enc, spans_per_text[ti], by_text.get(ti, []), spec))
        return results[0] if single else results

    def logits(self, texts: Sequence[str], task: str) -> np.ndarray:
        """Raw head outputs: (n, labels) for tc; for ner see :meth:`token_logits`."""
        spec = self._spec(task, None)
        if spec.kind != "tc":
            raise TaskKindError(f"logits() returns sentence logits; task {task!r} is 'ner': use token_logits()")
        _, batch = _as_batch(texts)
        clean = [_SURROGATE.sub("\ufffd", t) for t in batch]
        encs = self._tok.encode_batch(clean, add_special_tokens=False)
        rows = [e.ids[: spec.max_length - 2] for e in encs]
        return np.stack(self._run_rows(rows, spec, pooled=True))

    def token_logits(self, token_ids: Sequence[Sequence[int]], task: str) -> list[np.ndarray]:
        """Per-token head outputs for already tokenised rows (without [CLS]/[SEP])."""
        spec = self._spec(task, "ner")
        return self._run_rows([list(r) for r in token_ids], spec, pooled=False)

    # ---------------------------------------------------------------- stages
    def _spec(self, task: str, kind: str | None) -> TaskSpec:
        if not isinstance(task, str):
            raise InputError(f"task must be a task name (str), got {type(task).__name__}")
        spec = self.manifest.tasks.get(task)
        if spec is None:
            raise UnknownTaskError(f"unknown task {task!r}; this bundle has: {sorted(self.manifest.tasks)}")
        if kind is not None and spec.kind != kind:
            verb = "tag" if kind == "ner" else "classify"
            other = "classify" if kind == "ner" else "tag"
            raise TaskKindError(f"cannot {verb}() with task {task!r}: it is a "
                                f"{'classification' if spec.kind == 'tc' else 'NER'} task; use {other}()")
        return spec

    def _run_rows(self, rows: list[list[int]], spec: TaskSpec, pooled: bool) -> list[np.ndarray]:
        """Backbone + head over token rows; length-sorted padded batches; input order kept."""
        ids = self.manifest.special_ids
        head = self._heads[spec.name]
        adapter = self._adapters[spec.name]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: list[np.ndarray | None] = [None] * len(rows)
        for b0 in range(0, len(order), self.batch_size):
            chunk = order[b0: b0 + self.batch_size]
            width = max(len(rows[i]) for i in chunk) + 2
            input_ids = np.full((len(chunk), width), ids["pad"], np.int64)
            mask = np.zeros((len(chunk), width), np.int64)
            for r, i in enumerate(chunk):
                toks = rows[i]
                input_ids[r, : len(toks) + 2] = [ids["cls"], *toks, ids["sep"]]
                mask[r, : len(toks) + 2] = 1
            run_options = ort.RunOptions()
            if adapter is not None:
                run_options.add_active_adapter(adapter)
            hidden = self._session.run(["last_hidden_state"],
                                       {"input_ids": input_ids, "attention_mask": mask}, run_options)[0]
            if pooled:
                logits = mean_pool(hidden, mask) @ head.weight.T + head.bias  # (batch, labels)
                for r, i in enumerate(chunk):
                    out[i] = logits[r]
            else:
                logits = hidden @ head.weight.T + head.bias  # (batch, seq, labels)
                for r, i in enumerate(chunk):
                    out[i] = logits[r, 1: len(rows[i]) + 1]  # drop [CLS], [SEP], padding
        return out  # type: ignore[return-value]

    def _decode_words(self, text: str, enc: Encoding, spans: list[tuple[int, int]],
                      probs: list[np.ndarray], spec: TaskSpec) -> list[Entity]:
        word_ids = enc.word_ids
        offsets = enc.offsets
        first: dict[int, int] = {}
        char_span: dict[int, list[int]] = {}
        for pos, w in enumerate(word_ids):
            if w is None:
                continue
            first.setdefault(w, pos)
            s, e = offsets[pos]
            if w in char_span:
                char_span[w][1] = max(char_span[w][1], e)
            else:
                char_span[w] = [s, e]
        tags, scores, wspans = [], [], []
        for w in sorted(first):
            pos = first[w]
            k = best_window(pos, spans)
            p = probs[k][pos - spans[k][0]]
            j = int(p.argmax())
            tags.append(spec.labels[j])
            scores.append(float(p[j]))
            wspans.append((char_span[w][0], char_span[w][1]))
        return decode_bio(tags, scores, wspans, text)


def _as_batch(texts: str | Sequence[str]) -> tuple[bool, list[str]]:
    if isinstance(texts, str):
        return True, [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError("texts must be str, not bytes: decode them first (e.g. data.decode('utf-8'))")
    if not isinstance(texts, Sequence):
        raise InputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise InputError("texts is an empty list: pass at least one string")
    bad = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"every text must be a str; item {bad[0][0]} is {bad[0][1]}")
    return False, list(texts)
