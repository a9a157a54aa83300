"""Dynamic INT8 quantization of the backbone that keeps the LoRA path fp32 and intact.

``quantize_dynamic`` treats an input's default initializer as a constant weight: with
per-channel it crashes on the [in, 0] LoRA defaults, and with per-tensor it quantizes
them and drops the graph inputs, so no adapter could be fed. The LoRA MatMuls are
therefore excluded by name (the graph builder names them ``lora.<layer>.<target>.matmul_*``),
and the result is checked for every LoRA input before it is accepted.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from .graph import lora_input_names, lora_node_names

SCHEMES = ("per-channel", "per-tensor")


def _quantize(fp32: onnx.ModelProto, out_path: Path, scheme: str, excluded: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, src)
        quantize_dynamic(
            str(src), str(out_path),
            per_channel=scheme == "per-channel",
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],  # embeddings stay fp32: Gather is per-tensor only
            nodes_to_exclude=excluded,
            extra_options={"MatMulConstBOnly": True},
        )


def quantize_backbone(fp32: onnx.ModelProto, out_path: Path, scheme: str = "per-channel",
                      keep_fp32: list[str] | None = None) -> dict:
    """Write the INT8 backbone to ``out_path``; return a description for the manifest.

    ``keep_fp32``: names of further MatMul nodes to leave in fp32 (sensitive layers).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r}; choose from {SCHEMES}")
    present = {n.name for n in fp32.graph.node}
    kept = [n for n in (keep_fp32 or []) if n in present]
    excluded = lora_node_names(fp32) + kept
    # quantize_dynamic logs a pre-processing hint on the root logger; quant_pre_process
    # cannot run on these graphs (symbolic shape inference fails), so the hint is noise.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize(fp32, out_path, scheme, excluded)
    finally:
        root.setLevel(level)
    q = onnx.load(str(out_path))
    lost = sorted(set(lora_input_names(fp32)) - set(lora_input_names(q)))
    if lost:
        out_path.unlink(missing_ok=True)
        raise RuntimeError(f"quantization removed the LoRA inputs {lost[:4]}…; the adapters could not be fed")
    n_int8 = sum(1 for n in q.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    return {"method": "onnxruntime.quantize_dynamic", "scheme": scheme, "weight_type": "int8",
            "ops": ["MatMul"], "fp32_kept": ["LoRA MatMuls", "embeddings", "attention score MatMuls"],
            "fp32_matmuls_kept": kept, "int8_matmuls": n_int8}
