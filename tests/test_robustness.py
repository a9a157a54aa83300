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
