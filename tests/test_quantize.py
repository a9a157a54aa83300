"""INT8 recipes: schemes, MatMuls kept fp32 (presets, lists, auto), INT8 embeddings, sensitivities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from ckpt_factory import make_checkpoint, ort_format_token_logits  # noqa: E402
from mtpf_export.bundle import ExportError, export_bundle, fp32_keep_nodes  # noqa: E402
from mtpf_export.cli import main as export_main  # noqa: E402
from mtpf_export.graph import build_backbone, lora_input_names  # noqa: E402
from mtpf_export.quantize import (  # noqa: E402
    _dyn_int8_matmul, matmul_errors, quantize_embeddings, quantize_per_token, weight_matmuls,
)
from mtpf_runtime import InputError, Runtime  # noqa: E402

TASKS = {
    "ner": {"kind": "ner", "labels": ["O", "B-PER", "I-PER"], "adapter": "ner", "layers": (1,), "rank": 4},
    "tc": {"kind": "tc", "labels": ["a", "b"], "adapter": None},
}
TEXTS = ["Peter Blackburn met Angela Merkel in Berlin.", "short", "The quick brown fox jumps over the lazy dog."]
QUIET = {"log": lambda *a: None, "ort_format": False}


@pytest.fixture(scope="module")
def ckpt(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tiny_bert, tmp_path_factory.mktemp("q") / "ckpt", tasks=TASKS)


@pytest.fixture(scope="module")
def fp32_bundle(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qb") / "fp32"
    export_bundle(ckpt, out, precision="fp32", **QUIET)
    return out


def _outputs(bundle: Path) -> dict[str, list[np.ndarray]]:
    rt = Runtime(bundle)
    return {"ner": rt.token_logits([e.ids for e in rt._tok.encode_batch(TEXTS, add_special_tokens=False)], "ner"),
            "tc": list(rt.logits(TEXTS, "tc"))}


def test_keep_fp32_specs() -> None:
    assert fp32_keep_nodes("bert", 2, "none") == []
    assert fp32_keep_nodes("bert", 2, "ffn_out") == ["encoder.layer.0.output.dense.matmul",
                                                     "encoder.layer.1.output.dense.matmul"]
    assert fp32_keep_nodes("bert", 2, "ffn_out@1, query") == ["encoder.layer.1.output.dense.matmul",
                                                              "encoder.layer.0.attention.self.query.matmul",
                                                              "encoder.layer.1.attention.self.query.matmul"]
    errors = {"a": 0.1, "b": 0.3, "c": 0.2}
    assert fp32_keep_nodes("bert", 2, "auto:2", errors=errors) == ["b", "c"]
    # With a shared trunk, auto:N takes the trunk's MatMuls first, each group in rank order;
    # auto-any:N ranks every layer alike.
    q, f = "attention.self.query.matmul", "intermediate.dense.matmul"
    errors = {f"encoder.layer.0.{q}": 0.1, f"encoder.layer.0.{f}": 0.2, f"encoder.layer.1.{q}": 0.5,
              f"encoder.layer.1.{f}": 0.4, f"encoder.layer.2.{f}": 0.9}
    assert fp32_keep_nodes("bert", 3, "auto:1", errors=errors, split_layer=2) == [f"encoder.layer.1.{q}"]
    assert fp32_keep_nodes("bert", 3, "auto:3", errors=errors, split_layer=1) == [
        f"encoder.layer.0.{f}", f"encoder.layer.0.{q}", f"encoder.layer.2.{f}"]  # the trunk has 2: fill up
    assert fp32_keep_nodes("bert", 3, "auto:2", errors=errors) == [f"encoder.layer.2.{f}", f"encoder.layer.1.{q}"]
    assert fp32_keep_nodes("bert", 3, "auto-any:2", errors=errors, split_layer=2) == [
        f"encoder.layer.2.{f}", f"encoder.layer.1.{q}"]
    # auto:N+M: N from the trunk, M from the adapted layers
    assert fp32_keep_nodes("bert", 3, "auto:1+1", errors=errors, split_layer=1) == [
        f"encoder.layer.0.{f}", f"encoder.layer.2.{f}"]
    assert fp32_keep_nodes("bert", 3, "auto:0+2", errors=errors, split_layer=2) == [f"encoder.layer.2.{f}"]
    assert fp32_keep_nodes("bert", 3, "auto:1+1", errors=errors) == [f"encoder.layer.2.{f}", f"encoder.layer.1.{q}"]
    for bad, what in (("ffn_up", "unknown target"), ("ffn_out@2", "not in 0..1"), ("auto:x", "needs a count"),
                      ("auto:-1", "needs a count"), ("auto-any:", "auto-any needs a count"),
                      ("auto:1+x", "or auto:4\\+1"),
                      ("auto-any:1+1", "auto-any needs a count"), (",", "a preset")):
        with pytest.raises(ExportError, match=what):
            fp32_keep_nodes("bert", 2, bad, errors=errors)
    with pytest.raises(ExportError, match="sensitivities"):
        fp32_keep_nodes("bert", 2, "auto:3")


def test_simulated_dynamic_int8_is_what_onnxruntime_computes(tmp_path: Path) -> None:
    """matmul_errors ranks MatMuls with a numpy model of DynamicQuantizeMatMul: check it
    against ONNX Runtime's own quantized MatMul on the same data."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 24)).astype(np.float32) * np.linspace(0.1, 3, 24, dtype=np.float32)
    x = (rng.normal(size=(30, 48)) * 2 + 0.5).astype(np.float32)
    x[3, 7] = 25.0  # an outlier: the per-tensor activation scale is where dynamic INT8 loses
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    y_ort = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_sim, y = _dyn_int8_matmul(x, w), x @ w
    err = np.abs(y_ort - y).max()
    assert err > 1e-3  # quantization does change the result…
    assert np.abs(y_sim - y_ort).max() < 0.02 * err  # …and the model reproduces ONNX Runtime's result


def _matmul_graph(w: np.ndarray, opset: int, consumers: int = 1) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], [f"y{i}"], name=f"mm{i}") for i in range(consumers)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", w.shape[0]])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", w.shape[1]])
                           for i in range(consumers)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 18])
def test_per_token_graph_is_the_numpy_model_row_by_row(opset: int) -> None:
    """quantize_per_token's graph computes, for every token row, what the numpy model does
    for that row alone; both opset forms of ReduceMax/ReduceMin; shared inputs quantized once."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 24)).astype(np.float32) * np.linspace(0.1, 3, 24, dtype=np.float32)
    x = (rng.normal(size=(3, 10, 48)) * 2 + 0.5).astype(np.float32)
    x[1, 4, 7] = 40.0  # an outlier token
    x[2, 9] = 0.0  # an all-zero row (the scale floor)
    x[0, 2] = np.abs(x[0, 2])  # a row with no negative value (zero point 0)
    q = quantize_per_token(_matmul_graph(w, opset, consumers=2), excluded=[])
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("ReduceMax") == 1 and "MatMul" not in ops
    assert "w" not in {t.name for t in q.graph.initializer}  # the fp32 weight is gone
    y0, y1 = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = _dyn_int8_matmul(x.reshape(-1, 48), w, per_token=True).reshape(3, 10, 24)
    assert np.abs(y0 - want).max() < 1e-4 * np.abs(want).max()
    assert np.array_equal(y0, y1)
    assert np.allclose(y0[2, 9], 0.0)
    # per token, the outlier costs only its own row: the other rows of its text keep their precision
    exact = x @ w
    rows = [(1, i) for i in range(10) if i != 4]
    pt = max(np.abs(y0[r] - exact[r]).max() for r in rows)
    pert = _dyn_int8_matmul(x.reshape(-1, 48), w).reshape(3, 10, 24)  # one scale for the whole tensor
    assert pt * 2 < max(np.abs(pert[r] - exact[r]).max() for r in rows)


def test_per_token_bundle_gives_a_text_the_same_result_in_any_batch(ckpt: Path, tmp_path: Path) -> None:
    """With one activation scale per tensor (ONNX Runtime's dynamic INT8), a text's logits depend
    on the texts it is batched with; per token they do not."""
    alone_and_batched = {}
    for scheme in ("per-channel", "per-token"):
        out = tmp_path / scheme
        export_bundle(ckpt, out, scheme=scheme, keep_fp32="none", **QUIET)
        rt = Runtime(out)
        text = TEXTS[0]
        crowd = [text, "ZZZZ " * 8 + "!!!! ????", "1234567890 " * 3]
        alone = rt.logits([text], "tc")[0]
        batched = rt.logits(crowd, "tc")[0]
        ids = [rt._tok.encode_batch([t], add_special_tokens=False)[0].ids for t in crowd]
        ner_alone = rt.token_logits(ids[:1], "ner")[0]
        ner_batched = rt.token_logits(ids, "ner")[0]
        alone_and_batched[scheme] = max(float(np.abs(alone - batched).max()),
                                        float(np.abs(ner_alone - ner_batched).max()))
    with pytest.raises(InputError, match="row 1 has 200 tokens"):
        rt.token_logits([ids[0], [1000] * 200], "ner")
    assert alone_and_batched["per-token"] < 1e-4
    assert alone_and_batched["per-channel"] > 10 * max(alone_and_batched["per-token"], 1e-6)


def test_matmul_errors_cover_every_weight_matmul(ckpt: Path) -> None:
    model, _ = build_backbone(ckpt / "backbone", [(1, "query")])
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], np.int64)
    errors = matmul_errors(model, [{"input_ids": ids, "attention_mask": np.ones_like(ids)}])
    assert sorted(errors) == sorted(weight_matmuls(model))
    assert len(errors) == 2 * 6  # 2 layers x q, k, v, attn_out, ffn_in, ffn_out
    assert all(0 < e < 1 for e in errors.values())
    assert not any(n.startswith("lora.") for n in errors)
    per_token = matmul_errors(model, [{"input_ids": ids, "attention_mask": np.ones_like(ids)}], per_token=True)
    assert sorted(per_token) == sorted(errors)
    assert sum(per_token.values()) < sum(errors.values())  # a scale per row is never coarser than one per run


def test_int8_embeddings_are_per_row_and_keep_the_lora_inputs(ckpt: Path) -> None:
    model, _ = build_backbone(ckpt / "backbone", [(1, "query")])
    table = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "emb.word")
    saved = quantize_embeddings(model)
    assert saved == table.nbytes - table.size - 4 * table.shape[0]
    names = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "emb.word" not in names and names["emb.word.int8"].dtype == np.int8
    recon = names["emb.word.int8"].astype(np.float32) * names["emb.word.scale"]
    row_step = np.abs(table).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(recon - table) <= row_step / 2 + 1e-7)  # at most half a step of its own row
    assert lora_input_names(model)
    onnx.checker.check_model(model)
    assert quantize_embeddings(model) == 0  # nothing left to quantize (and top.onnx has no table)


@pytest.mark.parametrize("recipe", [
    {"scheme": "per-channel", "keep_fp32": "none", "embeddings": "int8"},
    {"scheme": "per-channel", "keep_fp32": "auto:3", "embeddings": "int8"},
    {"scheme": "static", "keep_fp32": "none", "embeddings": "fp32"},
    {"scheme": "per-tensor", "keep_fp32": "ffn_out@1", "embeddings": "fp32"},
    {"scheme": "per-token", "keep_fp32": "none", "embeddings": "int8"},
    {"scheme": "per-token", "keep_fp32": "auto:3", "embeddings": "fp32"},
    {"scheme": "per-token", "keep_fp32": "auto-any:3", "embeddings": "int8", "adapter_dtype": "float32"},
])
def test_recipes_export_serve_and_stay_close(ckpt: Path, fp32_bundle: Path, tmp_path: Path, recipe: dict) -> None:
    out = tmp_path / "b"
    m = export_bundle(ckpt, out, **recipe, **QUIET)
    q = m.quantization
    assert q["scheme"] == recipe["scheme"]
    assert q["embeddings"] == recipe["embeddings"]
    assert q["fp32_preset"] == recipe["keep_fp32"]
    if recipe["keep_fp32"].startswith("auto"):
        # The ner adapter is on layer 1 of 2: layer 0 is the shared trunk, and auto:N keeps its
        # MatMuls first; auto-any:N ranks both layers.
        errors = q["matmul_int8_errors"]
        pool = [k for k in errors if k.startswith("encoder.layer.0.") or recipe["keep_fp32"].startswith("auto-any")]
        want = sorted(pool, key=lambda k: -errors[k])[:3]
        assert sorted(q["fp32_matmuls_kept"]) == sorted(want)
    elif recipe["keep_fp32"] == "ffn_out@1":
        assert q["fp32_matmuls_kept"] == ["encoder.layer.1.output.dense.matmul"]
    graph = onnx.load(str(out / "backbone.onnx"))
    matmul_names = {n.name for n in graph.graph.node if n.op_type == "MatMul"}
    assert set(q["fp32_matmuls_kept"]) <= matmul_names  # kept ones are still plain fp32 MatMuls
    if recipe.get("embeddings") == "int8":
        assert q["embedding_bytes_saved"] > 0
        assert (out / "backbone.onnx").stat().st_size < (fp32_bundle / "backbone.onnx").stat().st_size - 2e6
    assert lora_input_names(graph)
    ref, got = _outputs(fp32_bundle), _outputs(out)
    for task in ref:
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ref[task], got[task]))
        assert diff < 0.5, (task, diff)  # INT8 noise on a random tiny model, not garbage
    assert json.loads((out / "manifest.json").read_text())["backbone"]["quantization"]["scheme"] == q["scheme"]


def test_default_recipe(ckpt: Path, tmp_path: Path) -> None:
    """The default is the study's pick (docs/quantization.md): per-token activation scales, the 6
    most sensitive weight MatMuls (under per-token INT8) of the shared trunk fp32, per-row INT8
    embeddings, and float16 adapters."""
    m = export_bundle(ckpt, tmp_path / "d", **QUIET)
    q = m.quantization
    assert (q["scheme"], q["fp32_preset"], q["embeddings"], m.lora_dtype) == ("per-token", "auto:6", "int8", "float16")
    # the ranking is made under the scheme the bundle ships: per-token errors, not ONNX Runtime's per-tensor ones
    pc = export_bundle(ckpt, tmp_path / "pc", scheme="per-channel", **QUIET).quantization["matmul_int8_errors"]
    assert sorted(pc) == sorted(q["matmul_int8_errors"])
    assert sum(q["matmul_int8_errors"].values()) < sum(pc.values())
    # the trunk (layer 0; the adapter is on layer 1) has exactly 6 weight MatMuls: auto:6 keeps them all
    assert sorted(q["fp32_matmuls_kept"]) == sorted(k for k in q["matmul_int8_errors"] if k.startswith("encoder.layer.0."))
    assert len(q["fp32_matmuls_kept"]) == 6


def test_cli_recipe_errors(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert export_main([str(ckpt), str(tmp_path / "x"), "--keep-fp32", "ffn_up", "--no-ort-format"]) == 2
    assert "unknown target 'ffn_up'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert export_main([str(ckpt), str(tmp_path / "x"), "--sample-file", str(tmp_path / "none.txt"),
                        "--no-ort-format"]) == 2
    assert "cannot read --sample-file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        export_main([str(ckpt), str(tmp_path / "x"), "--embeddings", "int4"])
    assert export_main([str(ckpt), str(tmp_path / "y"), "--keep-fp32", "auto:2", "--embeddings", "int8",
                        "--no-ort-format"]) == 0
    q = json.loads((tmp_path / "y" / "manifest.json").read_text())["backbone"]["quantization"]
    assert len(q["fp32_matmuls_kept"]) == 2 and q["embeddings"] == "int8"


def test_per_token_bundle_converts_to_ort_format_and_runs_there(ckpt: Path, tmp_path: Path) -> None:
    """The per-token graph uses standard operators only: ONNX Runtime's converter takes it, and
    mobile/backbone.ort with the task's adapter gives what Runtime gives."""
    out = tmp_path / "b"
    export_bundle(ckpt, out, scheme="per-token", keep_fp32="none", log=lambda *a: None)
    ops = (out / "mobile" / "required_operators.config").read_text()
    assert "MatMulInteger" in ops and "ReduceMax" in ops
    rt = Runtime(out)
    rows = [e.ids for e in rt._encode(TEXTS[:1])]
    np.testing.assert_allclose(ort_format_token_logits(out, "ner", rows[0]), rt.token_logits(rows, "ner")[0],
                               atol=1e-4)
