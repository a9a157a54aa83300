"""mtpf-export + Runtime on tiny random BERT and DistilBERT encoders.

Parity is against torch + PEFT on the same checkpoint; the real MiniLM and real data are in
test_minilm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckpt_factory import make_checkpoint  # noqa: E402
from mtpf_export import bundle as bundle_mod  # noqa: E402
from mtpf_export.bundle import ExportError, export_bundle  # noqa: E402
from mtpf_export.cli import main as export_main  # noqa: E402
from mtpf_runtime import (  # noqa: E402
    BundleError, FingerprintError, InputError, ManifestError, Runtime, SchemaVersionError,
    TaskKindError, UnknownTaskError,
)

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
TASKS = {
    "ner_a": {"kind": "ner", "labels": NER_LABELS, "adapter": "ner_a", "layers": (1,), "rank": 8},
    "ner_b": {"kind": "ner", "labels": NER_LABELS, "adapter": "ner_b", "layers": (0, 1), "rank": 4,
              "targets": ("query", "value", "ffn_out")},
    "tc_a": {"kind": "tc", "labels": ["neg", "pos"], "adapter": "tc_lora", "layers": (1,), "rank": 8},
    "tc_plain": {"kind": "tc", "labels": ["x", "y", "z"], "adapter": None},
}
TEXTS = ["Peter Blackburn met Angela Merkel in Berlin.", "short", "", "  ",
         "The quick brown fox jumps over the lazy dog near Paris, France!", "a " * 70]
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = request.getfixturevalue(f"tiny_{request.param}")
    return make_checkpoint(base, tmp_path_factory.mktemp("ck") / "ckpt", tasks=TASKS)


@pytest.fixture(scope="module")
def bundles(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {p: export_bundle(ckpt, root / p, precision=p, **QUIET) and root / p for p in ("fp32", "int8")}


def torch_reference(ckpt: Path, task: str, rows: list[list[int]]) -> list[np.ndarray]:
    """Logits from torch + PEFT: the reference the runtime must match."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModel

    meta = json.loads((ckpt / "tasks" / f"{task}.json").read_text())
    head = load_file(str(ckpt / "heads" / f"{task}.safetensors"))
    model = AutoModel.from_pretrained(ckpt / "backbone")
    if meta["adapter"]:
        model = PeftModel.from_pretrained(model, ckpt / "adapters" / meta["adapter"])
    model.eval()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([[101, *r, 102]])
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].numpy()
            h = h.mean(0) if meta["kind"] == "tc" else h[1:-1]
            out.append(h @ head["weight"].T + head["bias"])
    return out


def token_rows(rt: Runtime, texts: list[str], max_length: int) -> list[list[int]]:
    return [e.ids[: max_length - 2] for e in rt._tok.encode_batch(texts, add_special_tokens=False)]


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("task", sorted(TASKS))
def test_fp32_bundle_matches_torch_peft(ckpt: Path, bundles: dict, task: str) -> None:
    rt = Runtime(bundles["fp32"])
    rows = token_rows(rt, TEXTS, 64)
    ref = torch_reference(ckpt, task, rows)
    if TASKS[task]["kind"] == "tc":
        got = list(rt.logits(TEXTS, task))
    else:
        got = rt.token_logits(rows, task)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)


def test_adapters_change_the_output(bundles: dict) -> None:
    """A parity test is only meaningful if the adapters are not no-ops."""
    rt = Runtime(bundles["fp32"])
    rows = token_rows(rt, TEXTS[:1], 64)
    a = rt.token_logits(rows, "ner_a")[0]
    b = rt.token_logits(rows, "ner_b")[0]
    assert np.abs(a - b).max() > 1e-2


def test_without_adapters_is_the_plain_backbone_and_leaves_the_runtime_alone(bundles: dict) -> None:
    rt = Runtime(bundles["fp32"])
    floor = rt.without_adapters()
    rows = token_rows(rt, TEXTS[:2], 64)
    with_a = rt.token_logits(rows, "ner_a")
    plain = floor.token_logits(rows, "ner_a")
    assert max(np.abs(a - b).max() for a, b in zip(with_a, plain)) > 1e-2
    # a task without adapter is the same either way
    np.testing.assert_array_equal(floor.logits(TEXTS, "tc_plain"), rt.logits(TEXTS, "tc_plain"))
    # the view shares the session; the runtime it came from still feeds its adapters
    assert floor._session is rt._session
    for a, b in zip(rt.token_logits(rows, "ner_a"), with_a):
        np.testing.assert_array_equal(a, b)


def test_manifest_records_the_self_check(bundles: dict) -> None:
    m = json.loads((bundles["int8"] / "manifest.json").read_text())
    for name, t in m["tasks"].items():
        assert t["checks"]["fp32_max_logit_diff"] <= 1e-3
        assert 0.0 <= t["checks"]["int8_label_agreement"] <= 1.0
    assert m["backbone"]["precision"] == "int8" and m["backbone"]["quantization"]["int8_matmuls"] > 0
    assert m["schema_version"] == 3 and "onnxruntime" in m["producer"]


def test_int8_keeps_lora_inputs_and_differs_from_fp32(bundles: dict) -> None:
    import onnx

    for p in ("fp32", "int8"):
        g = onnx.load(str(bundles[p] / "backbone.onnx")).graph
        lora = [i.name for i in g.input if i.name.startswith("lora.")]
        assert len(lora) == 2 * len(Runtime(bundles[p]).manifest.lora_slots) > 0
    assert (bundles["int8"] / "backbone.onnx").stat().st_size < (bundles["fp32"] / "backbone.onnx").stat().st_size


# ---------------------------------------------------------------- adapter switching
def test_swap_a_b_a_is_bit_identical(bundles: dict) -> None:
    rt = Runtime(bundles["int8"])
    first = rt.tag(TEXTS, task="ner_a")
    rows = token_rows(rt, TEXTS, 64)
    la = rt.token_logits(rows, "ner_a")
    rt.token_logits(rows, "ner_b")
    rt.classify(TEXTS, task="tc_a")
    la2 = rt.token_logits(rows, "ner_a")
    for x, y in zip(la, la2):
        assert np.array_equal(x, y)
    assert rt.tag(TEXTS, task="ner_a") == first


def test_threads_on_different_tasks_match_serial(bundles: dict) -> None:
    rt = Runtime(bundles["int8"], threads=1)
    jobs = [("tag", "ner_a"), ("tag", "ner_b"), ("classify", "tc_a"), ("classify", "tc_plain")] * 6
    serial = [getattr(rt, fn)(TEXTS, task=t) for fn, t in jobs]
    results: list = [None] * len(jobs)
    errors: list = []

    def work(i: int) -> None:
        try:
            fn, t = jobs[i]
            results[i] = getattr(rt, fn)(TEXTS, task=t)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert results == serial


# ---------------------------------------------------------------- API results
def test_classify_and_tag_results(bundles: dict) -> None:
    rt = Runtime(bundles["int8"])
    assert {t.name: t.kind for t in rt.tasks} == {n: t["kind"] for n, t in TASKS.items()}
    assert [t.labels for t in rt.tasks if t.name == "ner_a"][0] == ("LOC", "PER")
    c = rt.classify(TEXTS[0], task="tc_plain")
    assert c.label in ("x", "y", "z") and abs(sum(c.scores.values()) - 1) < 1e-9
    assert c.score == max(c.scores.values())
    many = rt.classify(TEXTS, task="tc_a")
    assert len(many) == len(TEXTS)
    assert many[0].label == rt.classify(TEXTS[0], task="tc_a").label  # batch == single
    for text, ents in zip(TEXTS, rt.tag(TEXTS, task="ner_b")):
        for e in ents:
            assert text[e.start:e.end] == e.text and e.label in ("LOC", "PER") and 0 < e.score <= 1
    assert rt.tag("", task="ner_a") == [] and rt.tag("   \n", task="ner_a") == []


def test_long_text_is_tagged_in_windows_not_cut(bundles: dict) -> None:
    rt = Runtime(bundles["fp32"])
    vocab = ["peter", "met", "angela", "in", "berlin", "paris", "and", "the", "city", "of", "john"]
    words = [vocab[(i * 7) % len(vocab)] for i in range(300)]  # one word piece each
    long_text = " ".join(words)
    ents = rt.tag(long_text, task="ner_a")
    assert all(long_text[e.start:e.end] == e.text for e in ents)
    assert ents and max(e.end for e in ents) > len(long_text) - 40  # the tail was tagged too
    # max_length 64 -> windows of 62 tokens, stride 31: the first window alone decides
    # words 0..46, so they must be tagged exactly as the 62-word prefix on its own.
    prefix = " ".join(words[:62])
    limit = len(" ".join(words[:40]))
    inner = [(e.start, e.end, e.label) for e in ents if e.end <= limit]
    alone = [(e.start, e.end, e.label) for e in rt.tag(prefix, task="ner_a") if e.end <= limit]
    assert inner == alone


def test_tag_decodes_each_word_from_its_best_window(bundles: dict) -> None:
    """tag() against the decoding written out word by word: each word's first token, read in
    the window where it has the most context, softmax, argmax, BIO. Words of several pieces
    and windows that overlap are both in the text."""
    from mtpf_runtime.decode import best_window, decode_bio, softmax, windows

    rt = Runtime(bundles["fp32"])
    vocab = ["Schwarzenegger", "met", "Angela", "in", "Wolfsburg", "unbelievably", "and", "the", "Berliners"]
    text = " ".join(vocab[(i * 5) % len(vocab)] for i in range(120))
    enc = rt._tok.encode(text, add_special_tokens=False)
    spec = rt.manifest.tasks["ner_a"]
    size = spec.max_length - 2
    spans = windows(len(enc.ids), size, size // 2)
    assert len(spans) >= 4 and len(set(w for w in enc.word_ids if w is not None)) < len(enc.ids)
    logits = rt.token_logits([enc.ids[s:e] for s, e in spans], task="ner_a")
    tags, scores, wspans = [], [], []
    for w in sorted(set(w for w in enc.word_ids if w is not None)):
        pos = [i for i, x in enumerate(enc.word_ids) if x == w]
        k = best_window(pos[0], spans)
        p = softmax(logits[k][pos[0] - spans[k][0]])
        tags.append(spec.labels[int(p.argmax())])
        scores.append(float(p.max()))
        wspans.append((enc.offsets[pos[0]][0], max(enc.offsets[i][1] for i in pos)))
    want = decode_bio(tags, scores, wspans, text)
    got = rt.tag(text, task="ner_a")
    assert len(want) > 10
    assert [(e.label, e.start, e.end, e.text) for e in got] == [(e.label, e.start, e.end, e.text) for e in want]
    assert np.allclose([e.score for e in got], [e.score for e in want], rtol=0, atol=1e-12)


def test_batch_results_equal_one_by_one(bundles: dict) -> None:
    """fp32: padding never leaks into a row. INT8: dynamic quantization scales activations
    per run, so neighbours in a batch move scores slightly; labels must not move here."""
    for precision, tol in (("fp32", 1e-5), ("int8", 2e-2)):
        rt = Runtime(bundles[precision], batch_size=3)
        got = rt.classify(TEXTS, task="tc_a")
        for g, t in zip(got, TEXTS):
            one = rt.classify(t, task="tc_a")
            assert abs(g.score - one.score) < tol
    rt = Runtime(bundles["fp32"], batch_size=3)
    for batched, text in zip(rt.tag(TEXTS, task="ner_a"), TEXTS):
        alone = rt.tag(text, task="ner_a")
        assert [(e.start, e.end, e.label) for e in batched] == [(e.start, e.end, e.label) for e in alone]
        assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(batched, alone))


# ---------------------------------------------------------------- errors
def test_errors_say_what_was_wrong(bundles: dict) -> None:
    rt = Runtime(bundles["int8"])
    with pytest.raises(UnknownTaskError, match="ner_a"):
        rt.tag("x", task="nope")
    with pytest.raises(TaskKindError, match="classify"):
        rt.tag("x", task="tc_a")
    with pytest.raises(TaskKindError, match="tag"):
        rt.classify("x", task="ner_a")
    for bad in (3, None, b"bytes", ["ok", 3]):
        with pytest.raises(InputError):
            rt.classify(bad, task="tc_a")
    with pytest.raises(InputError, match="empty"):
        rt.tag([], task="ner_a")
    assert isinstance(UnknownTaskError("x"), KeyError) and isinstance(InputError("x"), TypeError)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_and_missing_files_are_refused(bundles: dict, tmp_path: Path) -> None:
    b = _copy(bundles["int8"], tmp_path / "b")
    adapter = b / "adapters" / "ner_a.onnx_adapter"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="ner_a.onnx_adapter.*sha256"):
        Runtime(b)
    adapter.unlink()
    with pytest.raises(BundleError, match="missing"):
        Runtime(b)
    with pytest.raises(BundleError, match="not found"):
        Runtime(tmp_path / "nowhere")


def test_manifest_schema_and_fingerprint_checks(bundles: dict, tmp_path: Path) -> None:
    b = _copy(bundles["int8"], tmp_path / "b")
    mpath = b / "manifest.json"
    orig = json.loads(mpath.read_text())
    m = json.loads(json.dumps(orig))
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError, match="re-export"):
        Runtime(b)
    m = json.loads(json.dumps(orig))
    m["tasks"]["ner_a"]["backbone_fingerprint"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(FingerprintError, match="ner_a"):
        Runtime(b)
    m = json.loads(json.dumps(orig))
    m["files"]["../../etc/passwd"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="escapes"):
        Runtime(b)
    mpath.write_text("{not json")
    with pytest.raises(ManifestError, match="JSON"):
        Runtime(b)


def test_adapter_from_another_backbone_is_refused(bundles: dict, tmp_path: Path) -> None:
    """An adapter blob from the fp32 bundle placed into the int8 bundle (sha256 updated)."""
    b = _copy(bundles["int8"], tmp_path / "b")
    shutil.copy2(bundles["fp32"] / "adapters" / "ner_a.onnx_adapter", b / "adapters" / "ner_a.onnx_adapter")
    m = json.loads((b / "manifest.json").read_text())
    from mtpf_runtime.manifest import sha256_file

    m["files"]["adapters/ner_a.onnx_adapter"] = sha256_file(b / "adapters" / "ner_a.onnx_adapter")
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FingerprintError, match="another backbone"):
        Runtime(b)


def _rewrite_adapter(path: Path, dtype) -> None:
    """The adapter at ``path`` again, its matrices cast to ``dtype``, the same model version."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    arrays = {k: v.numpy().astype(dtype) for k, v in fmt.get_parameters().items()}
    out = ort.AdapterFormat()
    out.set_adapter_version(fmt.get_adapter_version())
    out.set_model_version(fmt.get_model_version())
    out.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    out.export_adapter(str(path))


def test_adapter_of_the_wrong_type_is_refused(bundles: dict, tmp_path: Path) -> None:
    """The INT8 bundle's backbone takes float16 LoRA inputs: a float32 adapter made for the same
    backbone is refused when the bundle opens, with what it is and what was expected."""
    from mtpf_runtime.manifest import sha256_file

    b = _copy(bundles["int8"], tmp_path / "b")
    assert Runtime(b).manifest.lora_dtype == "float16"
    _rewrite_adapter(b / "adapters" / "tc_a.onnx_adapter", np.float32)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["adapters/tc_a.onnx_adapter"] = sha256_file(b / "adapters" / "tc_a.onnx_adapter")
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"tc_a.onnx_adapter: lora\.1\.\w+\.[AB] is tensor\(float\), but this "
                                          r"backbone's LoRA inputs take tensor\(float16\)"):
        Runtime(b)
    m["backbone"]["lora_dtype"] = "bfloat16"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="lora_dtype 'bfloat16'"):
        Runtime(b)
    del m["backbone"]["lora_dtype"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="lacks the required field 'lora_dtype'"):
        Runtime(b)


def test_float16_adapters_halve_the_files_and_keep_the_results(ckpt: Path, bundles: dict, tmp_path: Path) -> None:
    """An fp32 bundle with float16 adapters against the reference (fp32, float32 adapters): the
    adapter files are half the size, the logits differ only by the adapters' rounding, and
    the self-check holds the reference to torch and records the bundle's own agreement."""
    out = tmp_path / "b16"
    m = export_bundle(ckpt, out, precision="fp32", adapter_dtype="float16", **QUIET)
    ref = Runtime(bundles["fp32"])
    assert m.lora_dtype == "float16" and ref.manifest.lora_dtype == "float32"
    for name in ("ner_a", "ner_b", "tc_a"):
        new, old = (b / "adapters" / f"{name}.onnx_adapter" for b in (out, bundles["fp32"]))
        assert new.stat().st_size < 0.6 * old.stat().st_size
        checks = m.tasks[name].checks
        assert checks["fp32_max_logit_diff"] <= 1e-3 and checks["fp16_adapter_label_agreement"] >= 0.95
    rt = Runtime(out)
    rows = token_rows(rt, TEXTS, 64)
    for task in ("ner_a", "ner_b"):
        got, want = rt.token_logits(rows, task), ref.token_logits(rows, task)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want) if a.size)
        assert 0 < diff < 2e-2, (task, diff)  # rounded, not garbage
    np.testing.assert_allclose(rt.logits(TEXTS, "tc_a"), ref.logits(TEXTS, "tc_a"), atol=2e-2)


def test_adapter_values_beyond_float16_are_refused(tmp_path: Path) -> None:
    """A LoRA matrix float16 cannot hold is refused by name, not written as inf."""
    from mtpf_export.bundle import write_adapter

    lora = {(1, "query"): (np.full((4, 2), 7e4, np.float32), np.ones((2, 4), np.float32))}
    with pytest.raises(ExportError, match=r"lora\.1\.query\.A has values beyond float16's range .*7e\+04"):
        write_adapter(tmp_path / "x.onnx_adapter", lora, "0" * 64, "float16")
    write_adapter(tmp_path / "x.onnx_adapter", lora, "0" * 64, "float32")  # float32 holds them


# ---------------------------------------------------------------- export behaviour
def test_add_task_keeps_the_backbone(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_bundle(ckpt, out, tasks=["ner_a"], **QUIET)
    before = (out / "backbone.onnx").stat()
    export_bundle(ckpt, out, tasks=["tc_plain", "tc_a"], add_to=True, **QUIET)
    after = (out / "backbone.onnx").stat()
    assert after.st_ino == before.st_ino  # hard-linked, not rewritten
    rt = Runtime(out)
    assert sorted(t.name for t in rt.tasks) == ["ner_a", "tc_a", "tc_plain"]
    rt.tag(TEXTS[0], task="ner_a"), rt.classify(TEXTS[0], task="tc_a")
    added = sum((out / p).stat().st_size for p in ("adapters/tc_a.onnx_adapter", "heads/tc_a.npz"))
    assert added < 1_000_000
    # ner_b uses slots (layer 0, value, ...) the ner_a-only backbone lacks.
    with pytest.raises(ExportError, match="slots"):
        export_bundle(ckpt, out, tasks=["ner_b"], add_to=True, **QUIET)
    # the added adapters take the bundle's type; another type is refused before anything is written
    assert rt.manifest.lora_dtype == "float16"
    with pytest.raises(ExportError, match="takes float16 LoRA inputs, not float32"):
        export_bundle(ckpt, out, tasks=["tc_a"], add_to=True, adapter_dtype="float32", **QUIET)
    Runtime(out)  # the refused adds left the bundle intact


def test_failed_or_interrupted_export_leaves_old_bundle(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "b"
    export_bundle(ckpt, out, tasks=["tc_plain"], **QUIET)
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "write_adapter", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(ckpt, out, **QUIET)
    now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert now == snapshot
    assert sorted(os.listdir(tmp_path)) == ["b"]  # no staging leftovers


def test_broken_fp32_parity_fails_loudly(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    real = bundle_mod.build_backbone

    def perturbed(backbone_dir, slots, **kw):
        model, s = real(backbone_dir, slots, **kw)
        for init in model.graph.initializer:
            if init.name == "emb.ln.b":
                from onnx import numpy_helper

                arr = numpy_helper.to_array(init) + 0.5
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
        return model, s

    monkeypatch.setattr(bundle_mod, "build_backbone", perturbed)
    with pytest.raises(ExportError, match="differ from torch"):
        export_bundle(ckpt, tmp_path / "b", precision="fp32", **QUIET)
    assert not (tmp_path / "b").exists()


def test_export_cli(ckpt: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        export_main(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for opt in ("--precision", "--quantization", "--keep-fp32", "--task", "--add", "--sample-file", "--adapter-dtype"):
        assert opt in helptext
    assert export_main([str(ckpt), str(tmp_path / "b"), "--task", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "c")]) == 2
