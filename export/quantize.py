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
* ``per-token``: INT8 weights per output column as ``per-channel``, and each token's activation
  row quantized with its own uint8 scale and zero point at run time (``quantize_per_token``).
  ONNX Runtime's dynamic kernels take one activation scale for the whole input tensor, so there
  a text's result depends on the other texts of its batch and on their padding; per token it
  does not, and one outlier token costs only its own row's resolution.

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

SCHEMES = ("per-token", "per-channel", "per-tensor", "static")
DEFAULT_SCHEME = "per-token"  # docs/quantization.md, "Per-token activation scales"
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

    if scheme == "per-token":  # a graph rewrite in memory: no fp32 copy on disk for a quantizer to read
        onnx.save(quantize_per_token(fp32, excluded), str(out_path))
        return
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


def quantize_backbone(fp32: onnx.ModelProto, out_path: Path, scheme: str = DEFAULT_SCHEME,
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
    method = {"static": "onnxruntime.quantize_static (QDQ, min/max calibration)",
              "per-token": "mtpf per-token dynamic (uint8 activations per token, MatMulInteger)"}.get(
        scheme, "onnxruntime.quantize_dynamic")
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


def _dyn_int8_matmul(x: np.ndarray, w: np.ndarray, per_token: bool = False) -> np.ndarray:
    """What DynamicQuantizeMatMul computes: uint8 activations (one asymmetric scale per
    run, or per row of ``x`` with ``per_token``) times int8 weights (symmetric, one scale per
    output column)."""
    if per_token:
        lo = np.minimum(x.min(axis=-1, keepdims=True), 0.0)
        hi = np.maximum(x.max(axis=-1, keepdims=True), 0.0)
        sx = np.maximum((hi - lo) / 255.0, _MIN_SCALE)
    else:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        sx = (hi - lo) / 255.0 or 1.0
    zx = np.clip(np.rint(-lo / sx), 0, 255)
    xq = np.clip(np.rint(x / sx) + zx, 0, 255)
    wq, sw = _int8_columns(w)
    return ((xq - zx) @ wq.astype(w.dtype)) * sx * sw


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 of a weight ``[K, N]`` with one scale per output column, as
    ``quantize_dynamic`` per-channel does: (int8 weights, float32 scales ``[N]``)."""
    sw = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    sw[sw == 0] = 1.0
    return np.clip(np.rint(w / sw), -127, 127).astype(np.int8), sw


def matmul_errors(fp32: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                  per_token: bool = False) -> dict[str, float]:
    """Relative output error ``|Y_int8 - Y| / |Y|`` of each weight MatMul quantized alone,
    on the activations the fp32 graph produces for ``feeds`` (one run per feed), under the
    per-tensor activation scale of ``quantize_dynamic`` or, with ``per_token``, one per token."""
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
            err_num[n] += float(np.square(_dyn_int8_matmul(x, w, per_token) - y).sum())
            err_den[n] += float(np.square(y).sum())
    return {n: float(np.sqrt(err_num[n] / max(err_den[n], 1e-30))) for n in names}


_MIN_SCALE = 1e-12  # the activation scale of an all-zero row; any positive value gives q = zero point


def quantize_per_token(fp32: onnx.ModelProto, excluded: list[str]) -> onnx.ModelProto:
    """Per-token dynamic INT8 of every weight MatMul not in ``excluded`` (a new model).

    For ``Y = X @ W`` (X ``[..., K]``, W ``[K, N]``): W becomes INT8 with one symmetric scale
    ``sw`` per output column. At run time each row x of X (one token) gets its own asymmetric
    uint8 scale and zero point from its min and max (both widened to include 0, as ONNX
    Runtime's DynamicQuantizeLinear does per tensor): ``s = (hi - lo) / 255``,
    ``z = round(-lo / s)``, ``q = clip(round(x / s) + z, 0, 255)``. Then
    ``Y = s * sw * (q @ Wq - z * colsum(Wq))``: ``MatMulInteger`` computes ``q @ Wq`` in int32
    and the zero point's share is taken off with the column sums (a constant), because
    ``MatMulInteger`` takes no zero point per row of an N-d input. MatMuls that share an
    input (query, key and value) share its quantization. Standard ONNX operators only (opset
    13+), so ONNX Runtime Mobile runs it.
    """
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    g = model.graph
    targets = set(weight_matmuls(model)) - set(excluded)
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    consts = [numpy_helper.from_array(np.array(v, dtype=np.float32), name) for name, v in
              (("ptq.zero", 0.0), ("ptq.inv255", 1.0 / 255.0), ("ptq.min_scale", _MIN_SCALE), ("ptq.u8max", 255.0))]
    g.initializer.extend(consts)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ValueError(f"per-token quantization needs opset 13 or later (Clip with min/max inputs), got {opset}")
    if opset >= 18:  # ReduceMax/ReduceMin take their axes as an input from opset 18
        g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "ptq.last_axis"))

    def reduce(op: str, x: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node(op, [x, "ptq.last_axis"], [out], name=out, keepdims=1)
        return helper.make_node(op, [x], [out], name=out, axes=[-1], keepdims=1)

    quantized: dict[str, tuple[str, str, str]] = {}  # input -> (uint8 q, scale, zero point) tensors
    weights_done: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, wname = node.input
        if x not in quantized:
            p = f"ptq.{len(quantized)}"
            nodes += [
                reduce("ReduceMax", x, f"{p}.max"),
                reduce("ReduceMin", x, f"{p}.min"),
                helper.make_node("Max", [f"{p}.max", "ptq.zero"], [f"{p}.hi"], name=f"{p}.hi"),
                helper.make_node("Min", [f"{p}.min", "ptq.zero"], [f"{p}.lo"], name=f"{p}.lo"),
                helper.make_node("Sub", [f"{p}.hi", f"{p}.lo"], [f"{p}.range"], name=f"{p}.range"),
                helper.make_node("Mul", [f"{p}.range", "ptq.inv255"], [f"{p}.s0"], name=f"{p}.s0"),
                helper.make_node("Max", [f"{p}.s0", "ptq.min_scale"], [f"{p}.s"], name=f"{p}.s"),
                helper.make_node("Div", [f"{p}.lo", f"{p}.s"], [f"{p}.lo_s"], name=f"{p}.lo_s"),
                helper.make_node("Neg", [f"{p}.lo_s"], [f"{p}.zneg"], name=f"{p}.zneg"),
                helper.make_node("Round", [f"{p}.zneg"], [f"{p}.z"], name=f"{p}.z"),
                helper.make_node("Div", [x, f"{p}.s"], [f"{p}.xs"], name=f"{p}.xs"),
                helper.make_node("Round", [f"{p}.xs"], [f"{p}.xr"], name=f"{p}.xr"),
                helper.make_node("Add", [f"{p}.xr", f"{p}.z"], [f"{p}.xz"], name=f"{p}.xz"),
                helper.make_node("Clip", [f"{p}.xz", "ptq.zero", "ptq.u8max"], [f"{p}.xc"], name=f"{p}.xc"),
                helper.make_node("Cast", [f"{p}.xc"], [f"{p}.q"], name=f"{p}.q", to=TensorProto.UINT8),
            ]
            quantized[x] = (f"{p}.q", f"{p}.s", f"{p}.z")
        q, sx, zx = quantized[x]
        if wname not in weights_done:  # a weight two MatMuls share is stored once
            wq, sw = _int8_columns(numpy_helper.to_array(inits[wname]).astype(np.float32))
            colsum = wq.astype(np.int64).sum(axis=0).astype(np.float32)
            g.initializer.extend([numpy_helper.from_array(wq, f"{wname}.int8"),
                                  numpy_helper.from_array(sw, f"{wname}.wscale"),
                                  numpy_helper.from_array(colsum, f"{wname}.colsum")])
            weights_done.add(wname)
        m = node.name
        uses[wname] -= 1
        if uses[wname] == 0:
            g.initializer.remove(inits[wname])
        nodes += [
            helper.make_node("MatMulInteger", [q, f"{wname}.int8"], [f"{m}.acc"], name=f"{m}.int8"),
            helper.make_node("Cast", [f"{m}.acc"], [f"{m}.accf"], name=f"{m}.accf", to=TensorProto.FLOAT),
            helper.make_node("Mul", [zx, f"{wname}.colsum"], [f"{m}.zcorr"], name=f"{m}.zcorr"),
            helper.make_node("Sub", [f"{m}.accf", f"{m}.zcorr"], [f"{m}.centred"], name=f"{m}.centred"),
            helper.make_node("Mul", [sx, f"{wname}.wscale"], [f"{m}.scale"], name=f"{m}.scale"),
            helper.make_node("Mul", [f"{m}.centred", f"{m}.scale"], [node.output[0]], name=m),
        ]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return model
