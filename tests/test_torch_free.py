"""The runtime must import without torch, transformers, peft or onnx (the base install)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_runtime_import_is_torch_free() -> None:
    code = (
        "import sys, json, mtpf_runtime\n"
        "from mtpf_runtime import Runtime\n"
        "heavy = ['torch', 'transformers', 'peft', 'onnx', 'safetensors', 'sklearn']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
