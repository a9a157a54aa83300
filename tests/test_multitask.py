"""One pass for many tasks: shared trunk, mixed-task batches, ORT format, schema versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from ckpt_factory import make_checkpoint, ort_format_token_logits  # noqa: E402
from mtpf_runtime import BundleError, InputError, Runtime  # noqa: E402

NER = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
# Adapters on layer 1 of 2: layer 0 is the shared trunk.
TASKS = {
    "ner": {"kind": "ner", "labels": NER, "adapter": "ner", "layers": (1,), "max_length": 32},
    "ner2": {"kind": "ner", "labels": NER, "adapter": "ner2", "layers": (1,), "rank": 4, "max_length": 24},
    "tc": {"kind": "tc", "labels": ["a", "b", "c"], "adapter": "tc", "layers": (1,)},
    "probe": {"kind": "tc", "labels": ["x", "y"], "adapter": None},
}
TEXTS = ["Peter Blackburn met Angela Merkel in Berlin.", "", "short one",
         "word " * 50 + "Paris", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module", params=["fp32", "int8"])
def bundle(request: pytest.FixtureRequest, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtpf_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("multi")
    ckpt = make_checkpoint(tiny_bert, root / "ckpt", tasks=TASKS)
    export_bundle(ckpt, root / "b", precision=request.param, log=lambda *a: None)
    return root / "b"


def _same(a, b, tol: float) -> None:
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, tol)
    elif hasattr(a, "scores"):
        assert a.label == b.label and abs(a.score - b.score) < tol
    else:
        assert (a.start, a.end, a.label, a.text) == (b.start, b.end, b.label, b.text)
        assert abs(a.score - b.score) < tol


def test_bundle_has_trunk_split(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["schema_version"] == 3
    # an INT8 bundle's adapters are float16 by default, an fp32 bundle's float32
    assert m["backbone"]["lora_dtype"] == ("float16" if m["backbone"]["precision"] == "int8" else "float32")
    assert m["backbone"]["split_layer"] == 1 and m["backbone"]["top"] == "top.onnx"
    assert set(m["mobile"]) == {"backbone", "top"}


def test_analyze_equals_one_by_one(bundle: Path) -> None:
    rt = Runtime(bundle, batch_size=1)  # batch 1: INT8 activation scales then match exactly per row
    got = rt.analyze(TEXTS, ["ner", "tc", "probe", "ner2"])
    _same(got["ner"], rt.tag(TEXTS, task="ner"), 1e-4)
    _same(got["ner2"], rt.tag(TEXTS, task="ner2"), 1e-4)
    _same(got["tc"], rt.classify(TEXTS, task="tc"), 1e-4)
    _same(got["probe"], rt.classify(TEXTS, task="probe"), 1e-4)
    one = rt.analyze(TEXTS[0], ["tc", "ner"])
    _same(one["tc"], rt.classify(TEXTS[0], task="tc"), 1e-4)
    _same(one["ner"], rt.tag(TEXTS[0], task="ner"), 1e-4)


def test_analyze_runs_top_layers_only_for_later_tasks(bundle: Path, monkeypatch) -> None:
    rt = Runtime(bundle)
    calls = {"full": 0, "top": 0}
    full_run, top_run = rt._session.run, rt._top_session().run

    class Spy:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def run(self, *a, **k):
            calls[self.key] += 1
            return self.inner(*a, **k)

    rt._session, rt._top_holder["session"] = Spy(full_run, "full"), Spy(top_run, "top")
    rt.analyze(TEXTS[0], ["ner", "tc", "probe"])
    assert calls == {"full": 1, "top": 2}


def test_top_session_is_made_once_on_first_multitask_call(bundle: Path) -> None:
    import threading

    rt = Runtime(bundle)
    floor = rt.without_adapters()
    rt.classify(TEXTS[0], task="tc")
    rt.tag(TEXTS[0], task="ner")
    assert rt._top_holder["session"] is None  # single-task calls never load top.onnx
    errors: list[BaseException] = []

    def go() -> None:
        try:
            rt.analyze(TEXTS[0], ["ner", "tc"])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    made = rt._top_holder["session"]
    assert made is not None
    floor.analyze(TEXTS[0], ["ner", "tc"])
    assert floor._top_holder["session"] is made  # views share it


def test_worker_threads_sleep_between_runs_unless_spin_is_asked(bundle: Path) -> None:
    """Both sessions (backbone and top.onnx) carry the setting; it changes no result."""
    key = "session.intra_op.allow_spinning"
    quiet, spinning = Runtime(bundle, batch_size=1), Runtime(bundle, batch_size=1, spin=True)
    out = {}
    for name, rt in (("quiet", quiet), ("spinning", spinning)):
        out[name] = rt.analyze(TEXTS, ["ner", "tc"])
        for sess in (rt._session, rt._top_holder["session"]):
            assert sess.get_session_options().get_session_config_entry(key) == ("1" if rt is spinning else "0")
        assert rt.spin is (rt is spinning)
    for task in ("ner", "tc"):
        _same(out["quiet"][task], out["spinning"][task], 1e-6)
    with pytest.raises(TypeError, match="spin must be True or False"):
        Runtime(bundle, spin="no")  # type: ignore[arg-type]


def test_sessions_keep_layer_norm_unfused(bundle: Path, tmp_path: Path) -> None:
    """ONNX Runtime would fuse top.onnx's residual Add + LayerNormalization into its slower
    SkipLayerNormalization kernel; the runtime's sessions keep the plain ops."""
    import onnx
    import onnxruntime as ort

    from mtpf_runtime.runtime import _session

    def optimized_ops(name: str, make) -> set[str]:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        make(opts)
        return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}

    top = bundle / "top.onnx"
    default = optimized_ops("default", lambda o: ort.InferenceSession(str(top), o, providers=["CPUExecutionProvider"]))
    assert "SkipLayerNormalization" in default  # what the runtime turns off
    ours = optimized_ops("runtime", lambda o: _session(top, o))
    assert "SkipLayerNormalization" not in ours and "LayerNormalization" in ours
    assert "SkipLayerNormalization" not in optimized_ops("from_bytes", lambda o: _session(top, o, top.read_bytes()))


def test_sessions_plan_no_memory_pattern(bundle: Path) -> None:
    """A memory pattern keeps one planned block per input shape in the arena (4.9 MB more RSS
    for the MiniLM backbone); both of the runtime's sessions run without one."""
    rt = Runtime(bundle)
    rt.analyze("Peter met Angela in Berlin.", ["ner", "tc"])
    assert rt._session.get_session_options().enable_mem_pattern is False
    assert rt._top_session().get_session_options().enable_mem_pattern is False


def test_freed_heap_is_returned_after_each_session_is_made(bundle: Path, monkeypatch) -> None:
    """glibc keeps the pages a session's load freed; the runtime trims the heap once per session
    made (the backbone's in the constructor, top.onnx's on first use), never per request."""
    from mtpf_runtime import runtime as rt_mod

    calls = []
    monkeypatch.setattr(rt_mod, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    rt = Runtime(bundle)
    assert calls == [0]
    rt.tag("Peter met Angela in Berlin.", task="ner")
    assert calls == [0]
    rt.analyze("Peter met Angela in Berlin.", ["ner", "tc"])
    rt.analyze("Peter met Angela in Paris.", ["ner", "tc"])
    assert calls == [0, 0]
    monkeypatch.setattr(rt_mod, "_MALLOC_TRIM", None)  # a C library without malloc_trim
    assert Runtime(bundle).analyze("Peter met Angela.", ["ner", "tc"])


def test_top_onnx_changed_after_opening_is_refused(bundle: Path, tmp_path: Path) -> None:

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    rt = Runtime(copy)
    data = bytearray((copy / "top.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "top.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="top.onnx: sha256 differs"):
        rt.analyze(TEXTS[0], ["ner", "tc"])
    assert isinstance(rt.tag(TEXTS[0], task="ner"), list)  # single-task calls are unaffected


def test_mixed_batch_equals_per_task_calls(bundle: Path) -> None:
    rt = Runtime(bundle, batch_size=1)
    reqs = [(TEXTS[0], "ner"), (TEXTS[2], "tc"), (TEXTS[0], "tc"), (TEXTS[3], "ner2"), (TEXTS[1], "probe"),
            (TEXTS[4], "ner"), (TEXTS[4], "probe")]
    got = rt.run_mixed(reqs)
    for (text, task), g in zip(reqs, got):
        want = rt.tag(text, task=task) if task.startswith("ner") else rt.classify(text, task=task)
        _same(g, want, 1e-4)
    for bad in ([], "x", [("a",)], [(1, "tc")], [("a", "nope")]):
        with pytest.raises((InputError, KeyError)):
            rt.run_mixed(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="twice"):
        rt.analyze("x", ["tc", "tc"])


def test_ort_format_runs_with_onnxruntime_alone(bundle: Path) -> None:
    """mobile/backbone.ort + the .onnx_adapter + the npz head, no mtpf code in the path."""
    rt = Runtime(bundle)
    rows = [e.ids for e in rt._encode(TEXTS[:1])]
    np.testing.assert_allclose(ort_format_token_logits(bundle, "ner", rows[0]), rt.token_logits(rows, "ner")[0],
                               atol=1e-5)


def test_schema_1_bundle_still_loads(bundle: Path, tmp_path: Path) -> None:
    """A schema-1 bundle (no trunk graph) loads; multi-task calls run each task in full."""
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["schema_version"] = 1
    for key in ("top", "split_layer"):
        m["backbone"].pop(key)
    m.pop("mobile")
    for rel in ("top.onnx", "mobile/backbone.ort", "mobile/top.ort", "mobile/required_operators.config"):
        m["files"].pop(rel)
        (old / rel).unlink()
    (old / "manifest.json").write_text(json.dumps(m))
    if m["backbone"]["lora_dtype"] != "float32":
        # schemas 1-2 knew float32 adapters only: float16 ones under such a manifest are refused
        with pytest.raises(BundleError, match=r"tensor\(float16\), but this backbone's LoRA inputs take tensor\(float\)"):
            Runtime(old)
        return
    rt, new = Runtime(old, batch_size=1), Runtime(bundle, batch_size=1)
    assert not rt.shares_trunk
    got = rt.analyze(TEXTS, ["ner", "tc"])
    _same(got["ner"], new.tag(TEXTS, task="ner"), 1e-4)
    _same(got["tc"], new.classify(TEXTS, task="tc"), 1e-4)
