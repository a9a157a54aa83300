"""Module names of the BERT-like encoders mtpf supports, and the LoRA slot naming.

Every component that touches LoRA speaks of a *slot*: ``(layer index, logical target)``
where the logical target is one of ``query key value attn_out ffn_in ffn_out``. The
architecture table maps a slot to the Hugging Face module path, so training (PEFT
``target_modules``), export (parsing ``adapter_model.safetensors``) and the ONNX graph
(input names ``lora.<layer>.<target>.A|B``) agree without string guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOGICAL_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
# The paper's placement: attention query/key and both MLP matrices.
DEFAULT_TARGETS = ("query", "key", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class Arch:
    """Where the pieces of one encoder family live in the Hugging Face module tree."""

    model_type: str
    layers: str  # dotted path of the ModuleList of transformer layers
    modules: dict[str, str]  # logical target -> path relative to one layer


ARCHS: dict[str, Arch] = {
    "bert": Arch(
        "bert",
        "encoder.layer",
        {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
            "attn_out": "attention.output.dense",
            "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense",
        },
    ),
    "distilbert": Arch(
        "distilbert",
        "transformer.layer",
        {
            "query": "attention.q_lin",
            "key": "attention.k_lin",
            "value": "attention.v_lin",
            "attn_out": "attention.out_lin",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
        },
    ),
}
# BERT-shaped families that share BERT's module names.
for _alias in ("roberta", "xlm-roberta", "electra"):
    ARCHS[_alias] = Arch(_alias, ARCHS["bert"].layers, ARCHS["bert"].modules)


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported encoder model_type {model_type!r}; supported: {sorted(ARCHS)}"
        ) from None


def parse_layers(spec: int | str | list[int]) -> int | str | tuple[int, ...]:
    """The form of a layer spec, checked without a model: ``k`` >= 1, ``"all"``, or indices."""
    bad = ValueError(f"LoRA layers {spec!r}: give k >= 1 (the last k layers), 'all', "
                     "or layer indices such as '0,3,5'")
    if isinstance(spec, str):
        if spec == "all":
            return spec
        if not spec.isdigit():
            parts = [p.strip() for p in spec.split(",")]
            if not all(p.isdigit() for p in parts):
                raise bad
            return tuple(int(p) for p in parts)
        spec = int(spec)
    if isinstance(spec, int):
        if spec < 1:
            raise bad
        return spec
    return tuple(spec)


def resolve_layers(spec: int | str | list[int], num_layers: int) -> tuple[int, ...]:
    """``k`` (last k layers), ``"all"``, or an explicit list of layer indices."""
    spec = parse_layers(spec)
    if spec == "all":
        return tuple(range(num_layers))
    if isinstance(spec, int):
        if spec > num_layers:
            raise ValueError(f"LoRA layer count must be in 1..{num_layers}, got {spec}")
        return tuple(range(num_layers - spec, num_layers))
    layers = tuple(sorted(set(spec)))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"LoRA layers must lie in 0..{num_layers - 1}, got {list(spec)}")
    return layers


def check_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    bad = [t for t in targets if t not in LOGICAL_TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad}; choose from {LOGICAL_TARGETS}")
    return tuple(targets)


def peft_target_regex(arch: Arch, layers: tuple[int, ...], targets: tuple[str, ...]) -> str:
    """A PEFT ``target_modules`` regex (full match) for exactly these slots.

    A plain suffix list would be wrong for BERT: ``output.dense`` also matches the
    attention output projection ``attention.output.dense``.
    """
    layer_alt = "|".join(str(i) for i in layers)
    mod_alt = "|".join(re.escape(arch.modules[t]) for t in check_targets(targets))
    return rf"(?:.*\.)?{re.escape(arch.layers)}\.(?:{layer_alt})\.(?:{mod_alt})"


def parse_lora_key(arch: Arch, key: str) -> tuple[int, str, str] | None:
    """``...encoder.layer.5.attention.self.query.lora_A.weight`` -> ``(5, "query", "A")``."""
    m = re.search(
        rf"{re.escape(arch.layers)}\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key
    )
    if m is None:
        return None
    by_path = {path: name for name, path in arch.modules.items()}
    target = by_path.get(m.group(2))
    if target is None:
        raise ValueError(f"LoRA weight {key!r} sits on a module mtpf cannot export")
    return int(m.group(1)), target, m.group(3)


def graph_input_name(layer: int, target: str, which: str) -> str:
    """Name of the ONNX graph input (and ``.onnx_adapter`` parameter) of one LoRA matrix."""
    return f"lora.{layer}.{target}.{which}"
