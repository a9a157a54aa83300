"""Hostile input to the runtime: any Unicode gives a result, offsets stay exact.

Property-based (hypothesis) over a tiny exported bundle; plus a scan of the package for
pickle / eval.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ckpt_factory import make_checkpoint  # noqa: E402
from mtpf_runtime import InputError, Runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "ner": {"kind": "ner", "labels": ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"], "adapter": "ner",
            "layers": (1,), "max_length": 16},
    "tc": {"kind": "tc", "labels": ["a", "b", "c"], "adapter": None, "max_length": 16},
}


@pytest.fixture(scope="module")
def rt(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    from mtpf_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("robust")
    ckpt = make_checkpoint(tiny_bert, root / "ckpt", tasks=TASKS)
    # A strongly biased NER head would tag nothing; this factory's random head tags plenty.
    export_bundle(ckpt, root / "b", precision="int8", log=lambda *a: None)
    return Runtime(root / "b", threads=1)


WEIRD = st.sampled_from([
    "", " ", "\n\r\n\t", "\x00", "\u200b", "e\u0301\u0301", "\ufeff", "👩‍👩‍👧‍👦", "🇫🇷", "\ud800", "\udfff",
    "שלום עולם", "مرحبا", "\u202eevil", "Ａ", "ﬁ", "İstanbul", "ß", "\x7f", "\u2028", "...", "@user", "#tag",
    "Peter", "Paris", " Berlin ", "U.S.", "don't",
])
TEXT = st.lists(st.one_of(WEIRD, st.text(max_size=12)), max_size=12).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_any_unicode_tags_with_exact_offsets(rt: Runtime, texts: list[str]) -> None:
    for text, ents in zip(texts, rt.tag(texts, task="ner")):
        last = 0
        for e in ents:
            assert text[e.start:e.end] == e.text
            assert 0 <= e.start < e.end <= len(text) and e.start >= last  # ordered, no overlap
            assert 0.0 < e.score <= 1.0
            last = e.end


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_any_unicode_classifies_with_scores_summing_to_one(rt: Runtime, texts: list[str]) -> None:
    for c in rt.classify(texts, task="tc"):
        assert abs(sum(c.scores.values()) - 1.0) < 1e-9
        assert c.label in ("a", "b", "c") and c.scores[c.label] == c.score


def test_megabyte_text_is_tagged_whole(rt: Runtime) -> None:
    text = ("Peter met Paula in Paris. " * 40_000)[:1_000_000]
    ents = rt.tag(text, task="ner")
    assert all(text[e.start:e.end] == e.text for e in ents[:1000] + ents[-1000:])
    c = rt.classify(text, task="tc")
    assert abs(sum(c.scores.values()) - 1) < 1e-9


@pytest.mark.parametrize("bad", [None, 1, 1.5, b"x", bytearray(b"x"), [b"x"], ["ok", None], [], (), {"a": 1}])
def test_wrong_types_and_empty_batches_get_clear_errors(rt: Runtime, bad: object) -> None:
    with pytest.raises(InputError):
        rt.tag(bad, task="ner")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        rt.classify(bad, task="tc")  # type: ignore[arg-type]


def test_no_pickle_and_no_eval_in_the_package() -> None:
    """A bad file must never run code: no pickle, no eval/exec, np.load without pickles."""
    offenders = []
    for folder in ("mtpf_runtime", "export", "training", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal") for n in names):
                        offenders.append(f"{path}:{node.lineno} imports a pickle module")
                if isinstance(node, ast.Call):
                    fn = node.func
                    name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                    if isinstance(fn, ast.Name) and name in ("eval", "exec"):
                        offenders.append(f"{path}:{node.lineno} calls {name}")
                    if name == "load" and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "np":
                        kw = {k.arg: k.value for k in node.keywords}
                        if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                            offenders.append(f"{path}:{node.lineno} np.load without allow_pickle=False")
                    if name == "load" and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "torch":
                        kw = {k.arg: k.value for k in node.keywords}
                        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                            offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- tampered bundles
def _tamper(rt: Runtime, tmp_path: Path) -> Path:
    import shutil

    b = tmp_path / "b"
    shutil.copytree(rt.path, b)
    return b


def test_unknown_extra_file_is_refused(rt: Runtime, tmp_path: Path) -> None:
    from mtpf_runtime import BundleError

    b = _tamper(rt, tmp_path)
    (b / "adapters" / "evil.onnx_adapter").write_bytes(b"x")
    with pytest.raises(BundleError, match="evil.onnx_adapter.*not listed"):
        Runtime(b)


def test_symlink_escaping_the_bundle_is_refused(rt: Runtime, tmp_path: Path) -> None:
    import os

    from mtpf_runtime import BundleError

    b = _tamper(rt, tmp_path)
    outside = tmp_path / "outside.npz"
    head = b / "heads" / "tc.npz"
    outside.write_bytes(head.read_bytes())
    head.unlink()
    os.symlink(outside, head)
    with pytest.raises(BundleError, match="outside the bundle"):
        Runtime(b)


def test_truncated_backbone_is_refused_before_loading(rt: Runtime, tmp_path: Path) -> None:
    from mtpf_runtime import BundleError

    b = _tamper(rt, tmp_path)
    data = (b / "backbone.onnx").read_bytes()
    (b / "backbone.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="backbone.onnx.*sha256"):
        Runtime(b)


@pytest.mark.parametrize("edit", ["hidden", "labels", "layers", "max_length"])
def test_absurd_declared_shapes_are_refused(rt: Runtime, tmp_path: Path, edit: str) -> None:
    import json

    from mtpf_runtime import ManifestError

    b = _tamper(rt, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    if edit == "hidden":
        m["backbone"]["hidden_size"] = 10**9
    elif edit == "labels":
        m["tasks"]["tc"]["labels"] = [f"l{i}" for i in range(200_000)]
    elif edit == "layers":
        m["backbone"]["lora_slots"][0]["in"] = -3
    else:
        m["tasks"]["tc"]["max_length"] = 10**7
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError):
        Runtime(b)


# ---------------------------------------------------------------- concurrency soak
def test_threads_mixed_requests_match_serial_without_leaking(rt: Runtime) -> None:
    """8 threads x 2,000 mixed requests over 3 tasks: identical to serial, RSS flat."""
    import random
    import threading

    psutil = pytest.importorskip("psutil")

    rnd = random.Random(0)
    words = ["Peter", "met", "Paula", "in", "Paris", "the", "bank", "rose", "😀", "", "  "]
    texts = [" ".join(rnd.choice(words) for _ in range(rnd.randint(0, 12))) for _ in range(50)]
    calls = [("tag", "ner"), ("classify", "tc"), ("analyze", None)]
    reqs = [(rnd.choice(calls), rnd.choice(texts)) for _ in range(2000)]

    def do(req):
        (fn, task), text = req
        if fn == "analyze":
            return rt.analyze(text, ["ner", "tc"])
        return getattr(rt, fn)(text, task=task)

    serial = {i: do(r) for i, r in enumerate(reqs[:200])}
    proc = psutil.Process()
    rss: list[int] = []
    errors: list[BaseException] = []
    mismatches = []

    def worker(k: int) -> None:
        try:
            for j in range(2000):
                i = (k * 251 + j) % len(reqs)
                got = do(reqs[i])
                if i in serial and _key(got) != _key(serial[i]):
                    mismatches.append(i)
                if k == 0 and j % 100 == 0:
                    rss.append(proc.memory_info().rss)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:10]
    q = max(1, len(rss) // 4)
    first, last = sum(rss[:q]) / q, sum(rss[-q:]) / q
    assert last < first * 1.05, f"RSS grew from {first / 1e6:.0f} MB to {last / 1e6:.0f} MB"


def _key(result):
    """Labels and offsets: what must be identical (INT8 scores may differ by batch, not here: batch 1)."""
    if isinstance(result, dict):
        return {k: _key(v) for k, v in result.items()}
    if isinstance(result, list):
        return [(e.start, e.end, e.label, round(e.score, 6)) for e in result]
    return (result.label, round(result.score, 6))


# ---------------------------------------------------------------- the documented fault table
def _faults():
    """(what is injected, how to inject it into a bundle copy). Outcomes are observed, not assumed."""
    import json
    import os

    def edit(fn):
        def apply(b: Path) -> None:
            m = json.loads((b / "manifest.json").read_text())
            fn(m)
            (b / "manifest.json").write_text(json.dumps(m))
        return apply

    def flip(rel):
        def apply(b: Path) -> None:
            data = bytearray((b / rel).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (b / rel).write_bytes(bytes(data))
        return apply

    def symlink_out(b: Path) -> None:
        outside = b.parent / "outside.npz"
        outside.write_bytes((b / "heads/tc.npz").read_bytes())
        (b / "heads/tc.npz").unlink()
        os.symlink(outside, b / "heads/tc.npz")

    return [
        ("one flipped byte in an adapter", flip("adapters/ner.onnx_adapter")),
        ("backbone.onnx truncated to half", lambda b: (b / "backbone.onnx").write_bytes(
            (b / "backbone.onnx").read_bytes()[: (b / "backbone.onnx").stat().st_size // 2])),
        ("a head file deleted", lambda b: (b / "heads/tc.npz").unlink()),
        ("an unlisted extra file", lambda b: (b / "adapters/extra.onnx_adapter").write_bytes(b"x")),
        ("a head replaced by a symlink to outside the bundle", symlink_out),
        ("manifest lists a `../` path", edit(lambda m: m["files"].__setitem__("../x", "0" * 64))),
        ("manifest is not JSON", lambda b: (b / "manifest.json").write_text("{oops")),
        ("manifest schema_version 99", edit(lambda m: m.__setitem__("schema_version", 99))),
        ("task made for another backbone (fingerprint edited)",
         edit(lambda m: m["tasks"]["ner"].__setitem__("backbone_fingerprint", "f" * 64))),
        ("hidden_size declared as 10^9", edit(lambda m: m["backbone"].__setitem__("hidden_size", 10**9))),
        ("200,000 labels declared", edit(lambda m: m["tasks"]["tc"].__setitem__("labels", [str(i) for i in range(200_000)]))),
        ("unknown task kind", edit(lambda m: m["tasks"]["tc"].__setitem__("kind", "qa"))),
        ("manifest names the other adapter type (`lora_dtype`)", edit(lambda m: m["backbone"].__setitem__(
            "lora_dtype", {"float16": "float32", "float32": "float16"}[m["backbone"]["lora_dtype"]]))),
    ]


def _inputs(rt: Runtime):
    return [
        ("`tag(None)`", lambda: rt.tag(None, task="ner")),
        ("`tag(b'bytes')`", lambda: rt.tag(b"bytes", task="ner")),
        ("`classify([])`", lambda: rt.classify([], task="tc")),
        ("`classify(['ok', 3])`", lambda: rt.classify(["ok", 3], task="tc")),
        ("`tag(text, task='nope')`", lambda: rt.tag("x", task="nope")),
        ("`tag` on a classification task", lambda: rt.tag("x", task="tc")),
        ("`tag('')` and `tag('  \\n')`", lambda: [rt.tag("", task="ner"), rt.tag("  \n", task="ner")]),
        ("`classify('')`", lambda: type(rt.classify("", task="tc")).__name__),
        ("a lone surrogate `'\\ud800 Paris'`", lambda: all(
            "\ud800 Paris"[e.start:e.end] == e.text for e in rt.tag("\ud800 Paris", task="ner"))),
        ("`run_mixed([('a', 'nope')])`", lambda: rt.run_mixed([("a", "nope")])),
    ]


def _data_files(tmp_path: Path):
    """User data files in the wrong encoding, read by mtpf-adapt's readers."""
    from mtpf_training.data import read_conll, read_csv_tc, read_jsonl_tc

    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    conll = "Hi\tO\nZoë\tB-PER\n"
    jsonl = '{"text": "Hi", "label": "a"}\n{"text": "Zoë", "label": "b"}\n'
    csv = "text,label\nZoë,b\n"
    return [
        ("a CoNLL file saved as UTF-16 (with its BOM)",
         lambda: read_conll(write("u16.conll", conll.encode("utf-16")))),
        ("a JSONL file in UTF-16 without a BOM", lambda: read_jsonl_tc(write("u16.jsonl", jsonl.encode("utf-16-le")))),
        ("a CSV file in Latin-1 (`ë` on line 2)", lambda: read_csv_tc(write("l1.csv", csv.encode("latin-1")))),
        ("a CSV file with a UTF-8 BOM", lambda: read_csv_tc(write("bom.csv", b"\xef\xbb\xbf" + csv.encode()))),
    ]


def _outcome(fn) -> str:
    try:
        got = fn()
    except Exception as e:  # the observed outcome is what the table records
        import re

        msg = str(e).split(";")[0]
        msg = re.sub(r"(^|\s)/[^\s:]+", r"\1<path>", msg)  # tmp paths differ per run
        msg = re.sub(r"[0-9a-f]{64}|[0-9a-f]{12}…", "<sha256>", msg)
        if len(msg) > 140:  # cut at a word, and say so
            msg = msg[:140].rsplit(" ", 1)[0] + " …"
        return f"`{type(e).__name__}`: {msg}"
    return f"returns `{got!r}`"[:80]


def test_fault_table_in_docs_is_what_the_code_does(rt: Runtime, tmp_path: Path) -> None:
    """docs/robustness.md's table is regenerated here; set MTPF_WRITE_DOCS=1 to rewrite it."""
    import os
    import shutil

    rows = []
    for i, (what, inject) in enumerate(_faults()):
        b = tmp_path / f"b{i}"
        shutil.copytree(rt.path, b)
        inject(b)
        rows.append(f"| bundle: {what} | {_outcome(lambda: Runtime(b))} |")
    for what, call in _inputs(rt):
        rows.append(f"| input: {what} | {_outcome(call)} |")
    for what, call in _data_files(tmp_path):
        rows.append(f"| data: {what} | {_outcome(call)} |")
    table = "\n".join(["| injected | what happened |", "|---|---|", *rows])
    doc = REPO / "docs" / "robustness.md"
    begin, end = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"
    text = doc.read_text(encoding="utf-8")
    new = text.split(begin)[0] + begin + "\n" + table + "\n" + end + text.split(end)[1]
    if os.environ.get("MTPF_WRITE_DOCS") == "1":
        doc.write_text(new, encoding="utf-8")
    assert new == text, "docs/robustness.md is out of date; rerun with MTPF_WRITE_DOCS=1:\n" + table
    # Every bundle fault is refused before any compute, with an mtpf error.
    assert all("Error`" in r for r in rows[: len(_faults())])
