"""INT8 quantization of the backbone that keeps the LoRA path fp32 and intact.

Weights:
* ``per-channel`` / ``per-tensor``: ``quantize_dynamic`` (INT8 weights, activation scales
  computed per run). It treats an input's default initializer as a constant weight: with
  per-channel it crashes on the [in, 0] LoRA defaults, and with per-tensor it quantizes them
  and drops the graph inputs, so no adapter could be fed. The LoRA MatMuls are therefore
  excluded by name (the graph builder names them ``lora.<layer>.<target>.matmul_*``), and
  the result is checked for every LoRA input before it is accepted.
* ``static``: ``quantize_static`` in QDQ format, per-channel weights and INT8 activation
  ranges calibrated (min/max) on sample feeds.

Embeddings: ``quantize_embeddings`` stores the word-embedding table as INT8 with one fp32
scale per row (Gather int8 rows and their scales, Cast, Mul). ``quantize_dynamic`` can only
quantize a Gather table per tensor; per row, the largest error of a row is half a step of
that row's own range.

``matmul_errors`` ranks the weight MatMuls by how much dynamic INT8 changes their output on
real activations (the sensitivity that ``--keep-fp32 auto:N`` uses).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import lora_input_names, lora_node_names

SCHEMES = ("per-channel", "per-tensor", "static")
WORD_EMBEDDINGS = "emb.word"  # the graph builder's name for the word-embedding table


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizers log a pre-processing hint on the root logger; quant_pre_process cannot
    # run on these graphs (symbolic shape inference fails), so the hint is noise.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Feeds:
    """``CalibrationDataReader`` over a list of feed dicts (duck-typed: get_next/rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _quantize(fp32: onnx.ModelProto, out_path: Path, scheme: str, excluded: list[str],
              calibration: list[dict[str, np.ndarray]] | None) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, src)
        if scheme == "static":
            if not calibration:
                raise ValueError("static quantization needs calibration feeds")
            reader = type("Reader", (_Feeds, CalibrationDataReader), {})(calibration)
            quantize_static(
                str(src), str(out_path), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"], per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False},
                calibration_cache_path=str(Path(tmp) / "calib"),
            )
        else:
            quantize_dynamic(
                str(src), str(out_path),
                per_channel=scheme == "per-channel",
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=excluded,
                extra_options={"MatMulConstBOnly": True},
            )


def quantize_embeddings(model: onnx.ModelProto) -> int:
    """Replace the fp32 word-embedding table by INT8 rows and per-row scales, in place.

    Returns the bytes saved (0 when the graph has no word-embedding table, e.g. top.onnx).
    """
    init = next((t for t in model.graph.initializer if t.name == WORD_EMBEDDINGS), None)
    if init is None:
        return 0
    table = numpy_helper.to_array(init).astype(np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    users = [n for n in model.graph.node if WORD_EMBEDDINGS in n.input]
    if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != WORD_EMBEDDINGS:
        raise ValueError(f"{WORD_EMBEDDINGS} is expected to feed exactly one Gather")
    gather = users[0]
    ids, out = gather.input[1], gather.output[0]
    model.graph.initializer.remove(init)
    model.graph.initializer.extend([numpy_helper.from_array(q, f"{WORD_EMBEDDINGS}.int8"),
                                    numpy_helper.from_array(scale.astype(np.float32), f"{WORD_EMBEDDINGS}.scale")])
    at = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    new = [
        helper.make_node("Gather", [f"{WORD_EMBEDDINGS}.int8", ids], [f"{gather.name}.q"], name=f"{gather.name}.int8"),
        helper.make_node("Cast", [f"{gather.name}.q"], [f"{gather.name}.qf"], name=f"{gather.name}.cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{WORD_EMBEDDINGS}.scale", ids], [f"{gather.name}.s"],
                         name=f"{gather.name}.scale"),
        helper.make_node("Mul", [f"{gather.name}.qf", f"{gather.name}.s"], [out], name=gather.name),
    ]
    for k, node in enumerate(new):
        model.graph.node.insert(at + k, node)
    return table.nbytes - q.nbytes - scale.nbytes


def quantize_backbone(fp32: onnx.ModelProto, out_path: Path, scheme: str = "per-channel",
                      keep_fp32: list[str] | None = None, *, embeddings: str = "fp32",
                      calibration: list[dict[str, np.ndarray]] | None = None) -> dict:
    """Write the INT8 backbone to ``out_path``; return a description for the manifest.

    ``keep_fp32``: names of further MatMul nodes to leave in fp32 (sensitive layers).
    ``embeddings``: ``fp32`` or ``int8`` (per-row) word-embedding table.
    ``calibration``: feed dicts for the graph's inputs (``static`` only).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r}; choose from {SCHEMES}")
    if embeddings not in ("fp32", "int8"):
        raise ValueError(f"embeddings {embeddings!r}; choose fp32 or int8")
    present = {n.name for n in fp32.graph.node}
    kept = [n for n in (keep_fp32 or []) if n in present]
    excluded = lora_node_names(fp32) + kept
    with _quiet_root_logger():
        _quantize(fp32, out_path, scheme, excluded, calibration)
    q = onnx.load(str(out_path))
    lost = sorted(set(lora_input_names(fp32)) - set(lora_input_names(q)))
    if lost:
        out_path.unlink(missing_ok=True)
        raise RuntimeError(f"quantization removed the LoRA inputs {lost[:4]}…; the adapters could not be fed")
    saved = 0
    if embeddings == "int8":
        saved = quantize_embeddings(q)
        onnx.save(q, str(out_path))
    n_int8 = sum(1 for n in q.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    if scheme == "static":
        n_int8 = sum(1 for n in q.graph.node if n.op_type == "MatMul" and n.name not in excluded
                     and any(i.endswith("_DequantizeLinear_Output") for i in n.input))
    method = "onnxruntime.quantize_static (QDQ, min/max calibration)" if scheme == "static" \
        else "onnxruntime.quantize_dynamic"
    return {"method": method, "scheme": scheme, "weight_type": "int8", "ops": ["MatMul"],
            "embeddings": embeddings, "embedding_bytes_saved": saved,
            "fp32_kept": ["LoRA MatMuls", "attention score MatMuls"] + (["embeddings"] if embeddings == "fp32" else []),
            "fp32_matmuls_kept": kept, "int8_matmuls": n_int8}


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes with a constant weight that are not on the LoRA path."""
    consts = {t.name for t in model.graph.initializer}
    lora = set(lora_node_names(model))
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.name not in lora and n.input[1] in consts]


def _dyn_int8_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeMatMul computes: uint8 activations (one asymmetric scale per
    run) times int8 weights (symmetric, one scale per output column)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = (hi - lo) / 255.0 or 1.0
    zx = np.clip(np.rint(-lo / sx), 0, 255)
    xq = np.clip(np.rint(x / sx) + zx, 0, 255)
    sw = np.abs(w).max(axis=0, keepdims=True) / 127.0
    sw[sw == 0] = 1.0
    wq = np.clip(np.rint(w / sw), -127, 127)
    return ((xq - zx) @ wq) * sx * sw


def matmul_errors(fp32: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Relative output error ``|Y_int8 - Y| / |Y|`` of each weight MatMul quantized alone,
    on the activations the fp32 graph produces for ``feeds`` (one run per feed)."""
    import onnxruntime as ort

    names = weight_matmuls(fp32)
    node = {n.name: n for n in fp32.graph.node}
    weights = {t.name: t for t in fp32.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if node[n].input[0] not in have:
            probe.graph.output.append(helper.make_tensor_value_info(node[n].input[0], TensorProto.FLOAT, None))
            have.add(node[n].input[0])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fetch = [node[n].input[0] for n in names]
    err_num = dict.fromkeys(names, 0.0)
    err_den = dict.fromkeys(names, 0.0)
    for feed in feeds:
        acts = dict(zip(fetch, sess.run(fetch, feed)))
        mask = feed["attention_mask"].astype(bool)
        for n in names:
            x = acts[node[n].input[0]][mask]  # real tokens only, (tokens, in)
            w = numpy_helper.to_array(weights[node[n].input[1]])
            y = x @ w
            err_num[n] += float(np.square(_dyn_int8_matmul(x, w) - y).sum())
            err_den[n] += float(np.square(y).sum())
    return {n: float(np.sqrt(err_num[n] / max(err_den[n], 1e-30))) for n in names}
