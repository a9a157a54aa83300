"""mtpf runtime: serve many NER / classification tasks from one ONNX backbone.

Imports onnxruntime, tokenizers and numpy only: no torch, transformers, peft or onnx.
"""

from __future__ import annotations

from .decode import Classification, Entity
from .errors import (
    BundleError, FingerprintError, InputError, ManifestError, MtpfError, SchemaVersionError,
    TaskKindError, UnknownTaskError,
)
from .manifest import SCHEMA_VERSION, Manifest, TaskSpec, read_manifest
from .runtime import Runtime, TaskInfo

__all__ = [
    "SCHEMA_VERSION", "BundleError", "Classification", "Entity", "FingerprintError", "InputError",
    "Manifest", "ManifestError", "MtpfError", "Runtime", "SchemaVersionError", "TaskInfo",
    "TaskKindError", "TaskSpec", "UnknownTaskError", "read_manifest",
]
