"""Build the backbone ONNX graph directly from the checkpoint's weights.

Why not ``torch.onnx.export``: the graph must expose every LoRA A/B matrix of the
adapted layers as a graph input with an empty default initializer, and the quantizer
must be told exactly which MatMuls belong to LoRA. Writing the encoder with
``onnx.helper`` gives stable node and input names, no dependence on how a given
transformers release writes its attention masks, and a graph a reader can follow.
Parity with torch + PEFT is tested (fp32 logits within 1e-4).

The graph computes ``last_hidden_state`` [batch, seq, hidden] from ``input_ids`` and
``attention_mask`` (token types are all 0: mtpf tasks are single-sentence). A LoRA slot
adds ``(x @ A) @ B`` to its linear layer, with ``A`` [in, rank] and ``B`` [rank, out]
(the PEFT scaling alpha/r is folded into ``B`` by the adapter writer). The defaults are
[in, 0] and [0, out]: rank 0, a zero delta, so the plain backbone runs with no feed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mtpf_training.arch import arch_for, graph_input_name

OPSET = 17
# Large enough that exp() underflows to exactly 0 for padded keys, small enough that
# adding an attention score to it cannot overflow to -inf.
MASK_NEG = -1e9


@dataclass(frozen=True)
class LoraSlot:
    layer: int
    target: str
    in_features: int
    out_features: int

    @property
    def a_name(self) -> str:
        return graph_input_name(self.layer, self.target, "A")

    @property
    def b_name(self) -> str:
        return graph_input_name(self.layer, self.target, "B")


@dataclass(frozen=True)
class EncoderSpec:
    model_type: str
    hidden: int
    heads: int
    layers: int
    intermediate: int
    max_positions: int
    activation: str
    eps: float
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> EncoderSpec:
        mt = cfg.get("model_type")
        if mt == "bert":
            if cfg.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError("only absolute position embeddings are supported")
            return cls("bert", cfg["hidden_size"], cfg["num_attention_heads"],
                       cfg["num_hidden_layers"], cfg["intermediate_size"],
                       cfg["max_position_embeddings"], cfg.get("hidden_act", "gelu"),
                       cfg.get("layer_norm_eps", 1e-12), cfg["vocab_size"])
        if mt == "distilbert":
            return cls("distilbert", cfg["dim"], cfg["n_heads"], cfg["n_layers"],
                       cfg["hidden_dim"], cfg["max_position_embeddings"],
                       cfg.get("activation", "gelu"), 1e-12, cfg["vocab_size"])
        raise ValueError(f"cannot export model_type {mt!r}; supported: bert, distilbert")


# The LoRA inputs' element types: manifest name -> (ONNX type, numpy type).
LORA_DTYPES = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}


def load_weights(backbone_dir: Path) -> dict[str, np.ndarray]:
    """The backbone's weights as numpy, without the task-model prefix if one is there."""
    from safetensors.numpy import load_file

    raw = load_file(str(backbone_dir / "model.safetensors"))
    out = {}
    for k, v in raw.items():
        for prefix in ("bert.", "distilbert.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v.astype(np.float32) if v.dtype != np.int64 else v
    return out


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self._n += 1
        name = name or f"{op_type}_{self._n}"
        out = f"{name}:out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def build_backbone(
    backbone_dir: Path, slots: list[tuple[int, str]], *, part: str = "full",
    split_layer: int | None = None, lora_dtype: str = "float32",
) -> tuple[onnx.ModelProto, list[LoraSlot]]:
    """The encoder graph with LoRA inputs on ``slots`` ((layer, logical target) pairs).

    ``lora_dtype`` is the LoRA inputs' element type: ``float32``, or ``float16`` (half the
    memory each task's adapter holds; a Cast turns each matrix into fp32 before its MatMul,
    so the LoRA path still computes in fp32).

    ``split_layer`` L (the first adapted layer) enables the shared trunk: the ``full``
    graph also outputs ``trunk_hidden``, the hidden state entering layer L, which no
    adapter can change; ``part="top"`` builds only layers L.. with input ``trunk_hidden``,
    so further tasks on the same text run just those layers.
    """
    if part not in ("full", "top"):
        raise ValueError(f"part must be 'full' or 'top', got {part!r}")
    if lora_dtype not in LORA_DTYPES:
        raise ValueError(f"lora_dtype must be one of {sorted(LORA_DTYPES)}, got {lora_dtype!r}")
    onnx_type, np_type = LORA_DTYPES[lora_dtype]
    if part == "top" and split_layer is None:
        raise ValueError("part='top' needs split_layer")
    cfg = json.loads((backbone_dir / "config.json").read_text())
    spec = EncoderSpec.from_config(cfg)
    arch = arch_for(spec.model_type)
    w = load_weights(backbone_dir)
    b = _Builder()
    if spec.activation not in ("gelu", "relu"):
        raise ValueError(f"activation {spec.activation!r} is not supported (gelu, relu)")

    if part == "full":
        # ---- embeddings: word + position (+ token type 0 for BERT), LayerNorm
        word = b.op("Gather", [b.const("emb.word", w["embeddings.word_embeddings.weight"]), "input_ids"],
                    name="emb.word_gather")
        seq = b.op("Shape", ["input_ids"], start=1, end=2)  # [1]: the sequence length
        pos_table = w["embeddings.position_embeddings.weight"]
        if spec.model_type == "bert":
            # Token type is always 0: fold its row into the position table once.
            pos_table = pos_table + w["embeddings.token_type_embeddings.weight"][0]
        # The first `seq` rows of the table. (Slice, not Gather(Range): ORT 1.32's
        # Gather-to-Slice fusion breaks on a scalar Range.)
        zero = b.const("c.zero1", np.array([0], np.int64))
        pos = b.op("Slice", [b.const("emb.pos", pos_table), zero, seq, zero], name="emb.pos_slice")
        x = b.op("Add", [word, pos])
        ln = "embeddings.LayerNorm"
        x = b.op("LayerNormalization", [x, b.const("emb.ln.g", w[f"{ln}.weight"]),
                                        b.const("emb.ln.b", w[f"{ln}.bias"])], axis=-1, epsilon=spec.eps)
    else:
        x = "trunk_hidden"

    # ---- additive attention mask [batch, 1, 1, seq]
    m = b.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    m = b.op("Sub", [b.const("c.onef", np.array(1.0, np.float32)), m])
    m = b.op("Mul", [m, b.const("c.neg", np.array(MASK_NEG, np.float32))])
    mask = b.op("Unsqueeze", [m, b.const("c.axes12", np.array([1, 2], np.int64))])

    slot_set = set(slots)
    lora_slots: list[LoraSlot] = []
    dh = spec.hidden // spec.heads
    heads_shape = b.const("c.heads_shape", np.array([0, 0, spec.heads, dh], np.int64))
    merge_shape = b.const("c.merge_shape", np.array([0, 0, spec.hidden], np.int64))
    scale = b.const("c.scale", np.array(1.0 / math.sqrt(dh), np.float32))

    def linear(x: str, layer: int, target: str) -> str:
        path = f"{arch.layers}.{layer}.{arch.modules[target]}"
        wt = w[f"{path}.weight"]  # [out, in], torch layout
        y = b.op("MatMul", [x, b.const(f"{path}.wT", wt.T.copy())], name=f"{path}.matmul")
        y = b.op("Add", [y, b.const(f"{path}.b", w[f"{path}.bias"])], name=f"{path}.bias")
        if (layer, target) in slot_set:
            s = LoraSlot(layer, target, wt.shape[1], wt.shape[0])
            lora_slots.append(s)
            a_in = b.const(s.a_name, np.zeros((s.in_features, 0), np_type))
            b_in = b.const(s.b_name, np.zeros((0, s.out_features), np_type))
            if onnx_type != TensorProto.FLOAT:
                a_in = b.op("Cast", [a_in], name=f"lora.{layer}.{target}.cast_A", to=TensorProto.FLOAT)
                b_in = b.op("Cast", [b_in], name=f"lora.{layer}.{target}.cast_B", to=TensorProto.FLOAT)
            xa = b.op("MatMul", [x, a_in], name=f"lora.{layer}.{target}.matmul_A")
            d = b.op("MatMul", [xa, b_in], name=f"lora.{layer}.{target}.matmul_B")
            y = b.op("Add", [y, d], name=f"lora.{layer}.{target}.add")
        return y

    def split_heads(t: str) -> str:
        t = b.op("Reshape", [t, heads_shape])
        return b.op("Transpose", [t], perm=[0, 2, 1, 3])

    first = 0 if part == "full" else split_layer
    if split_layer is not None and not 0 < split_layer < spec.layers:
        raise ValueError(f"split_layer must lie in 1..{spec.layers - 1}, got {split_layer}")
    for i in range(first, spec.layers):
        if part == "full" and i == split_layer:
            b.nodes.append(helper.make_node("Identity", [x], ["trunk_hidden"], name="trunk_output"))
        p = f"{arch.layers}.{i}"
        q = split_heads(linear(x, i, "query"))
        k = split_heads(linear(x, i, "key"))
        v = split_heads(linear(x, i, "value"))
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        s = b.op("MatMul", [q, kt], name=f"{p}.scores")
        s = b.op("Add", [b.op("Mul", [s, scale]), mask])
        probs = b.op("Softmax", [s], axis=-1)
        ctx = b.op("MatMul", [probs, v], name=f"{p}.context")
        ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        attn = linear(ctx, i, "attn_out")
        ln1 = "attention.output.LayerNorm" if spec.model_type == "bert" else "sa_layer_norm"
        ln2 = "output.LayerNorm" if spec.model_type == "bert" else "output_layer_norm"
        h = b.op("LayerNormalization", [b.op("Add", [attn, x]), b.const(f"{p}.ln1.g", w[f"{p}.{ln1}.weight"]),
                                        b.const(f"{p}.ln1.b", w[f"{p}.{ln1}.bias"])], axis=-1, epsilon=spec.eps)
        f = linear(h, i, "ffn_in")
        if spec.activation == "gelu":
            # Exact (erf) GELU, as torch.nn.functional.gelu computes it.
            e = b.op("Erf", [b.op("Mul", [f, b.const(f"{p}.c.rsqrt2", np.array(1 / math.sqrt(2), np.float32))])])
            e = b.op("Add", [e, "c.onef"])
            f = b.op("Mul", [b.op("Mul", [f, e]), b.const(f"{p}.c.half", np.array(0.5, np.float32))])
        else:
            f = b.op("Relu", [f])
        out = linear(f, i, "ffn_out")
        x = b.op("LayerNormalization", [b.op("Add", [out, h]), b.const(f"{p}.ln2.g", w[f"{p}.{ln2}.weight"]),
                                        b.const(f"{p}.ln2.b", w[f"{p}.{ln2}.bias"])], axis=-1, epsilon=spec.eps)

    if part == "top":
        slot_set = {(layer, t) for layer, t in slot_set if layer >= split_layer}
    missing = slot_set - {(s.layer, s.target) for s in lora_slots}
    if missing:
        raise ValueError(f"LoRA slots {sorted(missing)} do not exist in a {spec.layers}-layer encoder")
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
        if part == "full" else
        helper.make_tensor_value_info("trunk_hidden", TensorProto.FLOAT, ["batch", "seq", spec.hidden]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]
    for s in lora_slots:
        # One symbolic rank per slot: adapters of different ranks share the graph.
        rank = f"rank.{s.layer}.{s.target}"
        inputs.append(helper.make_tensor_value_info(s.a_name, onnx_type, [s.in_features, rank]))
        inputs.append(helper.make_tensor_value_info(s.b_name, onnx_type, [rank, s.out_features]))
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                             ["batch", "seq", spec.hidden])]
    if part == "full" and split_layer is not None:
        outputs.append(helper.make_tensor_value_info("trunk_hidden", TensorProto.FLOAT,
                                                     ["batch", "seq", spec.hidden]))
    graph = helper.make_graph(b.nodes, "mtpf_backbone", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mtpf")
    model.ir_version = 9  # readable by ONNX Runtime 1.16+ and its mobile builds
    onnx.checker.check_model(model, full_check=False)
    return model, lora_slots


def lora_node_names(model: onnx.ModelProto) -> list[str]:
    """The MatMuls that read a LoRA matrix: they must stay fp32 (see quantize.py)."""
    return [n.name for n in model.graph.node if n.name.startswith("lora.") and n.op_type == "MatMul"]


def lora_input_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name.startswith("lora.")]
