"""The bundle's self-description: ``manifest.json`` as frozen, validated dataclasses.

A bundle is a folder::

    manifest.json               this file's schema (SCHEMA_VERSION)
    backbone.onnx               frozen encoder, LoRA A/B as graph inputs with empty defaults;
                                also outputs ``trunk_hidden`` (the input of the first adapted layer)
    top.onnx                    the adapted layers alone, from ``trunk_hidden`` (schema 2)
                                (schema 3: ``backbone.lora_dtype`` names the LoRA inputs' type,
                                float32 or float16; schemas 1-2 are float32)
    mobile/*.ort                the same graphs in ONNX Runtime's mobile (ORT) format (schema 2)
    tokenizer.json              Hugging Face tokenizers file
    adapters/<task>.onnx_adapter  ONNX Runtime adapter format (absent for a probe-only task)
    heads/<task>.npz            float32 ``weight`` [labels, hidden], ``bias`` [labels]; no pickle

Every file's sha256 is listed; the backbone's sha256 is its *fingerprint*, and each task
names the fingerprint it was exported for.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError, ManifestError, SchemaVersionError

SCHEMA_VERSION = 3
# Schema 1 (no shared-trunk graph) still loads: multi-task calls then run each task in full.
# Schema 2 has float32 LoRA inputs; schema 3 says which type they take (``lora_dtype``).
READABLE_SCHEMAS = (1, 2, 3)
# The element types a backbone's LoRA inputs (and so its tasks' adapter files) may have.
LORA_DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
# Absurd declared sizes are refused before anything is allocated.
_MAX_LABELS = 100_000
_MAX_LENGTH = 8192


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_model_version(fingerprint: str) -> int:
    """The backbone fingerprint as the int an ``.onnx_adapter`` can carry.

    The format holds an int32, so only 28 bits of the sha256 fit: a guard for apps that
    read the blob with ONNX Runtime alone. The manifest's full fingerprint is the real check.
    """
    return int(fingerprint[:7], 16)


def _req(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{MANIFEST}: {where} lacks the required field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ManifestError(f"{MANIFEST}: {where}.{key} must be {typ}, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class LoraSlotSpec:
    layer: int
    target: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "ner" | "tc"
    labels: tuple[str, ...]  # head order; BIO tags for NER
    max_length: int
    head: str  # relative path of the .npz
    adapter: str | None  # relative path of the .onnx_adapter, or None: plain backbone
    backbone_fingerprint: str
    checks: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not _NAME.match(self.name):
            raise ManifestError(f"{MANIFEST}: task name {self.name!r} is not [A-Za-z0-9_.-]{{1,64}}")
        if self.kind not in ("ner", "tc"):
            raise ManifestError(f"{MANIFEST}: {where} has kind {self.kind!r}; expected 'ner' or 'tc'")
        if not 1 <= len(self.labels) <= _MAX_LABELS or len(set(self.labels)) != len(self.labels):
            raise ManifestError(f"{MANIFEST}: {where} needs 1..{_MAX_LABELS} distinct labels")
        if self.kind == "ner":
            bad = [t for t in self.labels if t != "O" and not re.match(r"^[BI]-.+$", t)]
            if bad or "O" not in self.labels:
                raise ManifestError(f"{MANIFEST}: {where} labels must be BIO tags with 'O'; bad: {bad[:5]}")
        if not 2 < self.max_length <= _MAX_LENGTH:
            raise ManifestError(f"{MANIFEST}: {where}.max_length {self.max_length} is outside 3..{_MAX_LENGTH}")
        if not _SHA.match(self.backbone_fingerprint):
            raise ManifestError(f"{MANIFEST}: {where}.backbone_fingerprint is not a sha256 hex digest")

    @property
    def entity_types(self) -> tuple[str, ...]:
        return tuple(sorted({t[2:] for t in self.labels if t != "O"}))

    @classmethod
    def from_dict(cls, name: str, d: dict) -> TaskSpec:
        where = f"task {name!r}"
        labels = _req(d, "labels", list, where)
        if not all(isinstance(x, str) for x in labels):
            raise ManifestError(f"{MANIFEST}: {where}.labels must be strings")
        adapter = d.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise ManifestError(f"{MANIFEST}: {where}.adapter must be a path or null")
        return cls(name, _req(d, "kind", str, where), tuple(labels), _req(d, "max_length", int, where),
                   _req(d, "head", str, where), adapter, _req(d, "backbone_fingerprint", str, where),
                   d.get("checks", {}))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels), "max_length": self.max_length,
                "head": self.head, "adapter": self.adapter,
                "backbone_fingerprint": self.backbone_fingerprint, "checks": self.checks}


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    backbone: str
    fingerprint: str  # sha256 of the backbone file
    precision: str  # "fp32" | "int8"
    model_type: str
    hidden_size: int
    num_layers: int
    max_positions: int
    special_ids: dict  # cls / sep / pad token ids
    lora_slots: tuple[LoraSlotSpec, ...]
    tokenizer: str
    tasks: dict[str, TaskSpec]
    files: dict[str, str]  # relative path -> sha256
    source_sha256: str = ""  # sha256 of the checkpoint weights the backbone was built from
    quantization: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)
    top: str | None = None  # top.onnx: layers split_layer.. from trunk_hidden
    split_layer: int | None = None
    mobile: dict = field(default_factory=dict)  # {"backbone": "mobile/backbone.ort", "top": ...}
    lora_dtype: str = "float32"  # the LoRA inputs' element type; every adapter file holds this type

    def __post_init__(self) -> None:
        if self.schema_version not in READABLE_SCHEMAS:
            raise SchemaVersionError(
                f"{MANIFEST}: schema_version {self.schema_version} is not readable by this runtime "
                f"(reads {READABLE_SCHEMAS}); re-export the bundle with this mtpf's `mtpf-export`"
            )
        if (self.top is None) != (self.split_layer is None):
            raise ManifestError(f"{MANIFEST}: backbone.top and backbone.split_layer go together")
        if self.split_layer is not None and not 0 < self.split_layer < self.num_layers:
            raise ManifestError(f"{MANIFEST}: split_layer {self.split_layer} outside 1..{self.num_layers - 1}")
        for name, value, hi in (("hidden_size", self.hidden_size, 16384), ("num_layers", self.num_layers, 256),
                                ("max_positions", self.max_positions, 65536)):
            if not 1 <= value <= hi:
                raise ManifestError(f"{MANIFEST}: backbone.{name} {value} is outside 1..{hi}")
        for s in self.lora_slots:
            if not (0 <= s.layer < self.num_layers and 1 <= s.in_features <= 65536 and 1 <= s.out_features <= 65536):
                raise ManifestError(f"{MANIFEST}: LoRA slot {s} has an impossible layer or shape")
        if self.lora_dtype not in LORA_DTYPES:
            raise ManifestError(f"{MANIFEST}: backbone.lora_dtype {self.lora_dtype!r}; expected one of {LORA_DTYPES}")
        if self.schema_version < 3 and self.lora_dtype != "float32":
            raise ManifestError(f"{MANIFEST}: schema {self.schema_version} has float32 LoRA inputs only")
        if self.precision not in ("fp32", "int8"):
            raise ManifestError(f"{MANIFEST}: precision {self.precision!r}; expected 'fp32' or 'int8'")
        if not _SHA.match(self.fingerprint):
            raise ManifestError(f"{MANIFEST}: backbone fingerprint is not a sha256 hex digest")
        for key in ("cls", "sep", "pad"):
            if not isinstance(self.special_ids.get(key), int):
                raise ManifestError(f"{MANIFEST}: special_ids.{key} must be an int")
        for rel, digest in self.files.items():
            _check_relpath(rel)
            if not _SHA.match(str(digest)):
                raise ManifestError(f"{MANIFEST}: files[{rel!r}] is not a sha256 hex digest")
        for t in self.tasks.values():
            if t.max_length > self.max_positions:
                raise ManifestError(f"{MANIFEST}: task {t.name!r} max_length {t.max_length} exceeds "
                                    f"the backbone's {self.max_positions} positions")

    def check_complete(self) -> None:
        """Every file the bundle uses has a sha256 entry (a finished, not a draft, manifest)."""
        needed = {self.backbone, self.tokenizer} | ({self.top} if self.top else set())
        needed |= set(self.mobile.values())
        for t in self.tasks.values():
            needed |= {t.head} | ({t.adapter} if t.adapter else set())
        missing = sorted(needed - set(self.files))
        if missing:
            raise ManifestError(f"{MANIFEST}: files {missing} are used but have no sha256 entry")

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{MANIFEST}: top level must be a JSON object")
        version = _req(d, "schema_version", int, "manifest")
        if version not in READABLE_SCHEMAS:
            raise SchemaVersionError(
                f"{MANIFEST}: schema_version {version} is not readable by this runtime "
                f"(reads {READABLE_SCHEMAS}); re-export the bundle with this mtpf's `mtpf-export`"
            )
        bb = _req(d, "backbone", dict, "manifest")
        slots = []
        for s in _req(bb, "lora_slots", list, "backbone"):
            if not isinstance(s, dict):
                raise ManifestError(f"{MANIFEST}: backbone.lora_slots entries must be objects")
            slots.append(LoraSlotSpec(_req(s, "layer", int, "lora_slot"), _req(s, "target", str, "lora_slot"),
                                      _req(s, "in", int, "lora_slot"), _req(s, "out", int, "lora_slot")))
        tasks_raw = _req(d, "tasks", dict, "manifest")
        tasks = {}
        for name, td in tasks_raw.items():
            if not isinstance(td, dict):
                raise ManifestError(f"{MANIFEST}: task {name!r} must be an object")
            tasks[name] = TaskSpec.from_dict(name, td)
        tok = _req(d, "tokenizer", dict, "manifest")
        return cls(
            schema_version=version,
            backbone=_req(bb, "file", str, "backbone"),
            fingerprint=_req(bb, "fingerprint", str, "backbone"),
            precision=_req(bb, "precision", str, "backbone"),
            model_type=_req(bb, "model_type", str, "backbone"),
            hidden_size=_req(bb, "hidden_size", int, "backbone"),
            num_layers=_req(bb, "num_layers", int, "backbone"),
            max_positions=_req(bb, "max_positions", int, "backbone"),
            special_ids=_req(tok, "special_ids", dict, "tokenizer"),
            lora_slots=tuple(slots),
            tokenizer=_req(tok, "file", str, "tokenizer"),
            tasks=tasks,
            files=_req(d, "files", dict, "manifest"),
            source_sha256=bb.get("source_sha256", ""),
            quantization=bb.get("quantization", {}),
            producer=d.get("producer", {}),
            top=_opt(bb, "top", str, "backbone"),
            split_layer=_opt(bb, "split_layer", int, "backbone"),
            mobile=_str_map(d.get("mobile", {}), "mobile"),
            lora_dtype=_req(bb, "lora_dtype", str, "backbone") if version >= 3 else "float32",
        )

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "format": "mtpf-bundle",
            "backbone": {
                "file": self.backbone, "fingerprint": self.fingerprint, "precision": self.precision,
                "model_type": self.model_type, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "max_positions": self.max_positions,
                "source_sha256": self.source_sha256, "quantization": self.quantization,
                "top": self.top, "split_layer": self.split_layer,
                **({"lora_dtype": self.lora_dtype} if self.schema_version >= 3 else {}),
                "lora_slots": [{"layer": s.layer, "target": s.target, "in": s.in_features,
                                "out": s.out_features} for s in self.lora_slots],
            },
            "tokenizer": {"file": self.tokenizer, "special_ids": self.special_ids},
            "tasks": {n: t.to_dict() for n, t in sorted(self.tasks.items())},
            "files": dict(sorted(self.files.items())),
            "mobile": self.mobile,
            "producer": self.producer,
        }


def _opt(d: dict, key: str, typ: type, where: str) -> Any:
    v = d.get(key)
    if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
        raise ManifestError(f"{MANIFEST}: {where}.{key} must be {typ.__name__} or null")
    return v


def _str_map(v: Any, where: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ManifestError(f"{MANIFEST}: {where} must map names to file paths")
    return v


def _check_relpath(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")) or "\\" in rel:
        raise ManifestError(f"{MANIFEST}: file path {rel!r} escapes the bundle folder")


def resolve_file(root: Path, rel: str) -> Path:
    """A bundle-relative path, refused if it (or a symlink on it) leads outside the bundle."""
    _check_relpath(rel)
    path = root / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST})") from None
    if not real.is_relative_to(root.resolve()):
        raise BundleError(f"{path}: resolves to {real}, outside the bundle folder")
    if not real.is_file():
        raise BundleError(f"{path}: not a regular file")
    return real


def read_manifest(root: Path, verify: bool = True) -> Manifest:
    """Parse and validate ``manifest.json``; with ``verify`` check every file's sha256."""
    root = Path(root)
    if not root.is_dir():
        leftovers = sorted(root.parent.glob(f"{root.name}.old-*")) if root.parent.is_dir() else []
        hint = (f"; an interrupted export left {leftovers[0]}: run mtpf-export again"
                if leftovers else "")
        raise BundleError(f"{root}: bundle folder not found{hint}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; is {root} a bundle written by mtpf-export?")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{mpath}: not valid JSON ({e})") from None
    manifest = Manifest.from_dict(raw)
    manifest.check_complete()
    listed = set(manifest.files) | {MANIFEST}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() not in listed)
    if extra:
        raise BundleError(f"{root}: files {extra[:5]} are not listed in {MANIFEST}; a bundle holds only "
                          f"what its manifest lists (re-export, or remove them)")
    if verify:
        for rel, digest in manifest.files.items():
            path = resolve_file(root, rel)
            actual = sha256_file(path)
            if actual != digest:
                raise BundleError(f"{path}: sha256 {actual[:12]}… does not match the manifest's "
                                  f"{digest[:12]}…; the file is corrupted or was replaced")
    if manifest.files.get(manifest.backbone) != manifest.fingerprint:
        raise ManifestError(f"{mpath}: the backbone fingerprint differs from the sha256 of {manifest.backbone}")
    return manifest
