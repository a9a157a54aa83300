"""``Runtime``: one ONNX Runtime session for the backbone, every task adapter loaded once.

The adapter is chosen per call through a fresh ``RunOptions`` (ONNX Runtime's own
multi-LoRA API), so there is no "current adapter" that one thread could change under
another. All per-task state is a dict keyed by task name and never mutated after load.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from .decode import Classification, Entity, best_window, decode_bio, mean_pool, softmax, windows
from .errors import BundleError, FingerprintError, InputError, TaskKindError, UnknownTaskError
from .manifest import MANIFEST, Manifest, TaskSpec, adapter_model_version, read_manifest, resolve_file

# Lone surrogates cannot cross into the Rust tokenizer; replacing each by one U+FFFD keeps
# every character offset valid for the caller's original string.
_SURROGATE = re.compile("[\ud800-\udfff]")
# manifest backbone.lora_dtype -> what ONNX Runtime reports for an adapter parameter of that type
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


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
    ``spin``: let ONNX Runtime's worker threads spin on the CPU after each run (its own
    default) instead of sleeping. Off here: on a phone the spinning burns battery between
    requests, and with two sessions (backbone and ``top.onnx``) one session's spinning threads
    compete with the other's, which made ``analyze`` slower than two calls on 2 cores
    (docs/benchmarks.md, "Thread spinning"). Turn it on for back-to-back calls on a machine
    with cores to spare.
    """

    def __init__(self, bundle: str | os.PathLike, threads: int | None = None, *,
                 verify: bool = True, batch_size: int = 32, spin: bool = False) -> None:
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(spin, bool):
            raise TypeError(f"spin must be True or False, got {spin!r}")
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
        # No memory pattern: ONNX Runtime would plan one block per input shape and keep it in the
        # arena. Off, the arena holds 4.9 MB less after the MiniLM INT8 backbone's runs (2.0 MB
        # less for a merged model), for up to 1.4% more time per request (docs/benchmarks.md).
        opts.enable_mem_pattern = False
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        for pool in ("intra_op", "inter_op"):
            opts.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
        self._session = _session(resolve_file(self.path, m.backbone), opts)
        # top.onnx serves only multi-task calls: its session is made on first use (an app that
        # never calls analyze/run_mixed with several tasks does not pay its memory), from bytes
        # checked against the manifest at that moment. The holder is shared by views.
        self._verify = verify
        self._top_opts = opts
        self._top_holder: dict[str, Any] = {"session": None, "lock": threading.Lock()}
        if m.top:
            resolve_file(self.path, m.top)  # present and inside the bundle, or refused now
        _return_freed_heap()

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
        want_type = _ORT_TYPES[self.manifest.lora_dtype]
        for pname, value in params.items():
            if value.data_type() != want_type:
                raise BundleError(f"{path}: {pname} is {value.data_type()}, but this backbone's LoRA inputs take "
                                  f"{want_type} (manifest backbone.lora_dtype {self.manifest.lora_dtype!r}): "
                                  f"re-export the task against this bundle")
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

    @property
    def spin(self) -> bool:
        """Whether ONNX Runtime's worker threads spin between runs, as the session has it."""
        return self._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"

    @property
    def shares_trunk(self) -> bool:
        """Whether ``analyze``/``run_mixed`` run the unadapted lower layers once per text."""
        return self.manifest.top is not None

    def _top_session(self) -> ort.InferenceSession:
        holder = self._top_holder
        with holder["lock"]:
            if holder["session"] is None:
                rel = self.manifest.top
                assert rel is not None
                path = resolve_file(self.path, rel)
                data = path.read_bytes()
                if self._verify and hashlib.sha256(data).hexdigest() != self.manifest.files.get(rel):
                    raise BundleError(f"{path}: sha256 differs from {MANIFEST} (changed after the bundle "
                                      f"was opened); re-export the bundle")
                holder["session"] = _session(path, self._top_opts, data)
                del data
                _return_freed_heap()
            return holder["session"]

    def without_adapters(self) -> Runtime:
        """A view of this runtime that feeds no LoRA adapter: every task runs the plain
        backbone (LoRA inputs at their empty defaults) and its own head.

        It shares this runtime's session, tokenizer and heads (no extra memory). Its results
        are not the tasks' real outputs; it is the floor a benchmark compares against (what
        the backbone alone costs) and a way to see what an adapter changes.
        """
        view = copy.copy(self)
        view._adapters = dict.fromkeys(self._adapters)
        return view

    def classify(self, texts: str | Sequence[str], task: str) -> Classification | list[Classification]:
        """Label, its score and every label's score; softmax scores sum to 1.

        Texts longer than the task's max length are classified on their first
        ``max_length`` tokens (a document classifier sees the head of the text). Empty or
        whitespace-only text is classified as the empty sequence ``[CLS] [SEP]``.
        """
        single, batch = _as_batch(texts)
        spec = self._spec(task, "tc")
        out = self._serve([(t, spec) for t in batch])
        return out[0] if single else out

    def tag(self, texts: str | Sequence[str], task: str) -> list[Entity] | list[list[Entity]]:
        """Entities with label, score and character offsets into each original string.

        Long texts are tagged in overlapping windows of the task's max length and merged:
        each word takes the prediction of the window where it has most context. Empty or
        whitespace-only text has no entities (``[]``).
        """
        single, batch = _as_batch(texts)
        spec = self._spec(task, "ner")
        out = self._serve([(t, spec) for t in batch])
        return out[0] if single else out

    def analyze(self, texts: str | Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
        """Several tasks on the same texts in one pass: ``{task: classify/tag result}``.

        The layers below the first adapted layer are identical for every task, so they run
        once per text; only the adapted top layers run per task. Results equal calling the
        tasks one by one (within float tolerance).
        """
        single, batch = _as_batch(texts)
        specs = self._task_list(tasks)
        flat = self._serve([(t, spec) for spec in specs for t in batch])
        n = len(batch)
        return {spec.name: (flat[k * n] if single else flat[k * n:(k + 1) * n])
                for k, spec in enumerate(specs)}

    def run_mixed(self, requests: Sequence[tuple[str, str]]) -> list[Any]:
        """A batch whose rows ask for different tasks: ``[(text, task), ...]`` -> results in order.

        Every row's lower layers run together in one batch; rows are then grouped by task for
        the adapted layers. Each result is what ``classify``/``tag`` would return for that row.
        """
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise InputError("requests must be a non-empty list of (text, task) pairs")
        items = []
        for i, r in enumerate(requests):
            if not (isinstance(r, tuple) and len(r) == 2):
                raise InputError(f"request {i} must be a (text, task) pair, got {type(r).__name__}")
            text, task = r
            if not isinstance(text, str):
                raise InputError(f"request {i}: text must be str, got {type(text).__name__}")
            items.append((text, self._spec(task, None)))
        return self._serve(items)

    def logits(self, texts: Sequence[str], task: str) -> np.ndarray:
        """Raw head outputs of a classification task: (n, labels)."""
        spec = self._spec(task, None)
        if spec.kind != "tc":
            raise TaskKindError(f"logits() returns sentence logits; task {task!r} is 'ner': use token_logits()")
        _, batch = _as_batch(texts)
        rows = [e.ids[: spec.max_length - 2] for e in self._encode(batch)]
        return np.stack(self._run_rows(rows, spec, pooled=True))

    def token_logits(self, token_ids: Sequence[Sequence[int]], task: str) -> list[np.ndarray]:
        """Per-token head outputs for already tokenised rows (without [CLS]/[SEP])."""
        spec = self._spec(task, "ner")
        rows = [list(r) for r in token_ids]
        most = self.manifest.max_positions - 2
        long = next((i for i, r in enumerate(rows) if len(r) > most), None)
        if long is not None:  # past the position table the graph fails with a broadcasting error
            raise InputError(f"token_logits: row {long} has {len(rows[long])} tokens; the backbone takes at most "
                             f"{most} ({self.manifest.max_positions} positions less [CLS] and [SEP]); "
                             f"tag() splits long texts into windows")
        return self._run_rows(rows, spec, pooled=False)

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

    def _task_list(self, tasks: Sequence[str]) -> list[TaskSpec]:
        if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
            raise InputError("tasks must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise InputError(f"tasks lists a task twice: {list(tasks)}")
        return [self._spec(t, None) for t in tasks]

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        clean = [_SURROGATE.sub("\ufffd", t) for t in texts]
        return self._tok.encode_batch(clean, add_special_tokens=False)

    def _serve(self, items: list[tuple[str, TaskSpec]]) -> list[Any]:
        """prepare (tokenise once per distinct text, rows per task) -> run -> decode."""
        distinct = list(dict.fromkeys(t for t, _ in items))
        enc_of = dict(zip(distinct, self._encode(distinct)))
        # prepare: rows per item; a NER item may have several windows
        rows: list[list[int]] = []
        row_spec: list[TaskSpec] = []
        item_rows: list[list[int]] = []
        item_spans: list[list[tuple[int, int]]] = []
        for text, spec in items:
            ids = enc_of[text].ids
            if spec.kind == "tc":
                spans = [(0, min(len(ids), spec.max_length - 2))]
            else:
                size = spec.max_length - 2
                spans = windows(len(ids), size, max(1, size // 2)) if ids else []
            item_spans.append(spans)
            item_rows.append(list(range(len(rows), len(rows) + len(spans))))
            rows.extend(ids[s:e] for s, e in spans)
            row_spec.extend([spec] * len(spans))
        outputs = self._run_grouped(rows, row_spec)
        # decode
        results: list[Any] = []
        for (text, spec), spans, idx in zip(items, item_spans, item_rows):
            if spec.kind == "tc":
                p = softmax(outputs[idx[0]])
                i = int(p.argmax())
                results.append(Classification(spec.labels[i], float(p[i]),
                                              {lab: float(v) for lab, v in zip(spec.labels, p)}))
            else:
                results.append(self._decode_words(text, enc_of[text], spans, [outputs[k] for k in idx], spec))
        return results

    def _run_grouped(self, rows: list[list[int]], row_spec: list[TaskSpec]) -> list[np.ndarray]:
        """Head outputs per row. One task: the full backbone. Several: trunk once, top per task."""
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(row_spec):
            groups.setdefault(spec.name, []).append(i)
        out: list[np.ndarray | None] = [None] * len(rows)
        if len(groups) == 1 or self.manifest.top is None:
            for name, idx in groups.items():
                spec = self.manifest.tasks[name]
                for i, o in zip(idx, self._run_rows([rows[i] for i in idx], spec, spec.kind == "tc")):
                    out[i] = o
            return out  # type: ignore[return-value]
        # Shared trunk. ONNX Runtime runs the whole graph whatever is fetched, so a
        # trunk-only run would cost a full one: instead each row's first task runs the full
        # backbone and also returns the trunk state; later tasks on that row run top.onnx only.
        trunk: dict[tuple[int, ...], np.ndarray] = {}
        for name, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            spec = self.manifest.tasks[name]
            pooled = spec.kind == "tc"
            fresh = [i for i in idx if tuple(rows[i]) not in trunk]
            cached = [i for i in idx if tuple(rows[i]) in trunk]
            if fresh:
                states: list[np.ndarray] = []
                for i, o in zip(fresh, self._run_rows([rows[i] for i in fresh], spec, pooled, states)):
                    out[i] = o
                for i, st in zip(fresh, states):
                    trunk.setdefault(tuple(rows[i]), st)
            if cached:
                for i, o in zip(cached, self._run_top([trunk[tuple(rows[i])] for i in cached], spec, pooled)):
                    out[i] = o
        return out  # type: ignore[return-value]

    def _batches(self, lengths: list[int]):
        """Index chunks of at most ``batch_size``, sorted by length (less padding)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        for b0 in range(0, len(order), self.batch_size):
            yield order[b0: b0 + self.batch_size]

    def _pad_ids(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.manifest.special_ids
        width = max(len(r) for r in rows) + 2
        input_ids = np.full((len(rows), width), ids["pad"], np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for r, toks in enumerate(rows):
            input_ids[r, : len(toks) + 2] = [ids["cls"], *toks, ids["sep"]]
            mask[r, : len(toks) + 2] = 1
        return input_ids, mask

    def _run_options(self, spec: TaskSpec | None) -> ort.RunOptions:
        run_options = ort.RunOptions()
        adapter = self._adapters[spec.name] if spec is not None else None
        if adapter is not None:
            run_options.add_active_adapter(adapter)
        return run_options

    def _head(self, hidden: np.ndarray, mask: np.ndarray, n_tokens: list[int], spec: TaskSpec,
              pooled: bool) -> list[np.ndarray]:
        # numpy's own einsum loops, not BLAS: a multi-threaded BLAS (numpy's OpenBLAS) keeps its
        # threads spinning for ~100 ms after a product this size (66 x 384 by 384 x 21), CPU
        # spent after every request for a product that takes 0.1 ms on one thread.
        head = self._heads[spec.name]
        if pooled:
            logits = np.einsum("bh,lh->bl", mean_pool(hidden, mask), head.weight, optimize=False) + head.bias
            return list(logits)
        logits = np.einsum("bsh,lh->bsl", hidden, head.weight, optimize=False) + head.bias  # (batch, seq, labels)
        return [logits[r, 1: n + 1] for r, n in enumerate(n_tokens)]  # drop [CLS], [SEP], padding

    def _run_rows(self, rows: list[list[int]], spec: TaskSpec, pooled: bool,
                  trunk_out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Full backbone + head over token rows; length-sorted padded batches; order kept.

        ``trunk_out``: also collect each row's trunk state, (len + 2, hidden), in row order.
        """
        out: list[np.ndarray | None] = [None] * len(rows)
        states: list[np.ndarray | None] = [None] * len(rows)
        fetch = ["last_hidden_state"] + (["trunk_hidden"] if trunk_out is not None else [])
        for chunk in self._batches([len(r) for r in rows]):
            input_ids, mask = self._pad_ids([rows[i] for i in chunk])
            res = self._session.run(fetch, {"input_ids": input_ids, "attention_mask": mask},
                                    self._run_options(spec))
            for i, o in zip(chunk, self._head(res[0], mask, [len(rows[i]) for i in chunk], spec, pooled)):
                out[i] = o
            if trunk_out is not None:
                for r, i in enumerate(chunk):
                    states[i] = res[1][r, : len(rows[i]) + 2]
        if trunk_out is not None:
            trunk_out.extend(states)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _run_top(self, hiddens: list[np.ndarray], spec: TaskSpec, pooled: bool) -> list[np.ndarray]:
        top = self._top_session()
        out: list[np.ndarray | None] = [None] * len(hiddens)
        for chunk in self._batches([len(h) for h in hiddens]):
            width = max(len(hiddens[i]) for i in chunk)
            x = np.zeros((len(chunk), width, self.manifest.hidden_size), np.float32)
            mask = np.zeros((len(chunk), width), np.int64)
            for r, i in enumerate(chunk):
                x[r, : len(hiddens[i])] = hiddens[i]
                mask[r, : len(hiddens[i])] = 1
            hidden = top.run(["last_hidden_state"], {"trunk_hidden": x, "attention_mask": mask},
                                   self._run_options(spec))[0]
            for i, o in zip(chunk, self._head(hidden, mask, [len(hiddens[i]) - 2 for i in chunk], spec, pooled)):
                out[i] = o
        return out  # type: ignore[return-value]

    def _decode_words(self, text: str, enc: Encoding, spans: list[tuple[int, int]],
                      logits: list[np.ndarray], spec: TaskSpec) -> list[Entity]:
        """Per-window token logits -> one tag per word (its first token, read in the window
        where that token has the most context) -> entities.

        One softmax and one argmax over all the words' rows: a per-word numpy call costs
        microseconds each, which a 64-word text with many entities added up to ~0.2 ms."""
        first: dict[int, int] = {}
        char_span: dict[int, list[int]] = {}
        for pos, (w, (s, e)) in enumerate(zip(enc.word_ids, enc.offsets)):
            if w is None:
                continue
            if w in char_span:
                char_span[w][1] = max(char_span[w][1], e)
            else:
                first[w] = pos
                char_span[w] = [s, e]
        if not first:
            return []
        words = sorted(first)
        if len(spans) == 1:
            rows = [first[w] - spans[0][0] for w in words]
            table = logits[0]
        else:  # row of each word's first token in the windows' logits stacked end to end
            starts = np.cumsum([0] + [len(x) for x in logits[:-1]]).tolist()
            rows = []
            for w in words:
                k = best_window(first[w], spans)
                rows.append(starts[k] + first[w] - spans[k][0])
            table = np.concatenate(logits)
        p = softmax(table[rows])
        best = p.argmax(axis=-1)
        scores = p[np.arange(len(rows)), best].tolist()
        tags = [spec.labels[j] for j in best.tolist()]
        return decode_bio(tags, scores, [(char_span[w][0], char_span[w][1]) for w in words], text)


# ONNX Runtime fuses each residual Add + LayerNormalization of top.onnx into its contrib
# SkipLayerNormalization, whose CPU kernel took 165 us where the plain LayerNormalization takes
# 22 us (66 x 384, one thread, ONNX Runtime 1.32): top.onnx ran 6-13% slower fused (the INT8 and
# fp32 bundles, seq 16-128, batch 1 and 8, 1 and 2 threads; docs/benchmarks.md). backbone.onnx
# is not fused either way. Outputs differ by < 4e-6.
_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def _session(path: Path, opts: ort.SessionOptions, data: bytes | None = None) -> ort.InferenceSession:
    """A CPU session on ``path`` (or on ``data``, the bytes already read and checked from it)."""
    try:
        return ort.InferenceSession(str(path) if data is None else data, opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=_DISABLED_OPTIMIZERS)
    except Exception as e:
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({e})") from None


def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return None


# glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows).
_MALLOC_TRIM = _malloc_trim()


def _return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS, where the C library can (glibc).

    Making a session allocates memory that it frees again (the process's peak RSS was 14 MB
    above its steady state with the MiniLM INT8 bundle). glibc keeps freed pages of its heap
    mapped: here 7–10 MB of RSS that nothing used, a different amount from one process to the
    next (docs/benchmarks.md, session 20). The trim took 0.8 ms; it runs after a session is
    made, never per request."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
