"""Tests for mtpf_training.data: every registered dataset loads from ../shared/data,
the generic readers parse user files, and bad input gives a DataError naming file+line."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from mtpf_training.data import (
    DataError, Dataset, NerExample, PairExample, TcExample, available_datasets, data_root,
    entity_types, load_dataset, load_pairs, load_raw_sentences, load_user_dataset, read_conll,
    read_csv_tc, read_jsonl_ner, read_jsonl_tc, to_iob2,
)

TAG_RE = re.compile(r"^(O|[BI]-.+)$")
_CACHE: dict[str, Dataset] = {}


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """Real-data tests need ../shared/data; skip without it unless MTPF_REQUIRE_DATA=1."""
    root = data_root()
    if not root.is_dir():
        msg = f"../shared/data not found: {root} (set MTPF_DATA to point at it)"
        if os.environ.get("MTPF_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def _load(name: str) -> Dataset:
    if name not in _CACHE:
        _CACHE[name] = load_dataset(name)
    return _CACHE[name]


# ----------------------------------------------------------------------------- registry

def test_registry_names() -> None:
    reg = available_datasets()
    assert reg["conll2003"] == "ner" and reg["sst2"] == "tc"
    assert {f"tweeteval_{t}" for t in ("emoji", "sentiment", "stance_hillary")} <= set(reg)
    assert sum(k == "ner" for k in reg.values()) == 13
    assert set(reg.values()) == {"ner", "tc"}


@pytest.mark.parametrize("name", sorted(available_datasets()))
def test_every_dataset_loads(shared_data: Path, name: str) -> None:
    ds = _load(name)
    assert ds.name == name and ds.kind == available_datasets()[name]
    assert ds.train and ds.test and ds.labels and ds.split_note
    for split in (ds.train, ds.dev, ds.test):
        assert isinstance(split, tuple)
        for ex in split:
            if ds.kind == "ner":
                assert isinstance(ex, NerExample)
                assert len(ex.tokens) == len(ex.tags) > 0
                assert all(TAG_RE.match(t) for t in ex.tags)
                assert all(tok.strip() == tok and tok for tok in ex.tokens)
                assert ex.tags == to_iob2(ex.tags)
            else:
                assert isinstance(ex, TcExample)
                assert ex.label in ds.labels and ex.text
    if ds.kind == "ner":
        assert ds.labels == entity_types(ds.train + ds.dev + ds.test)
        assert list(ds.labels) == sorted(ds.labels)


@pytest.mark.parametrize("name,counts", [
    ("conll2003", (14041, 3250, 3453)),
    ("wnut17", (3394, 1009, 1287)),
    ("btc", (6338, 1000, 2001)),
    ("tweebank_ner", (1639, 710, 1201)),
    ("bc5cdr", (4560, 4581, 4797)),
    ("ncbi_disease", (5424, 923, 940)),
    ("crossner_politics", (200, 541, 651)),
    ("mit_movie_eng", (9775, 0, 2443)),
    ("mit_movie_trivia", (7816, 0, 1953)),
    ("sst2", (6920, 872, 1821)),
    ("sst5", (8544, 1101, 2210)),
    ("emotion", (16000, 2000, 2000)),
    ("trec", (5452, 0, 500)),
    ("tweeteval_emoji", (45000, 5000, 50000)),
    ("tweeteval_sentiment", (2000, 0, 12284)),
])
def test_known_counts(shared_data: Path, name: str, counts: tuple[int, int, int]) -> None:
    ds = _load(name)
    assert (len(ds.train), len(ds.dev), len(ds.test)) == counts


def test_dataset_details(shared_data: Path) -> None:
    assert _load("conll2003").labels == ("LOC", "MISC", "ORG", "PER")
    assert _load("btc").labels == ("LOC", "ORG", "PER")
    assert _load("trec").labels == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert _load("ag_news").labels == ("World", "Sports", "Business", "Sci/Tech")
    assert sum(len(s) for s in (_load("ag_news").train, _load("ag_news").dev, _load("ag_news").test)) == 7600
    assert _load("tweeteval_emotion").labels == ("anger", "joy", "optimism", "sadness")
    assert len(_load("tweeteval_emoji").labels) == 20
    assert "val" in _load("tweeteval_sentiment").split_note
    mr = _load("mr")
    assert len(mr.train) + len(mr.dev) + len(mr.test) == 10662
    assert "seed" in mr.split_note
    ng = _load("20newsgroups")
    assert len(ng.labels) == 20 and not any(ex.text.startswith("From:") for ex in ng.train[:50])
    # BTC: tokens with spaces are kept whole, empty tokens dropped
    assert any(" " in tok for ex in _load("btc").dev for tok in ex.tokens)


def test_seeded_split_is_deterministic(shared_data: Path) -> None:
    a, b = load_dataset("cr"), load_dataset("cr")
    assert a == b
    assert (len(a.train), len(a.dev)) == (int(0.8 * 3771), int(0.1 * 3771))
    assert len(a.train) + len(a.dev) + len(a.test) == 3771
    # the source has duplicate lines (CR 6, MPQA 2265, SMS 414), so check the cut is a
    # partition of the file lines (as a multiset), not a set of distinct texts
    lines = []
    for f, lab in (("custrev.neg", "negative"), ("custrev.pos", "positive")):
        text = (shared_data / "tc/cr" / f).read_text(encoding="utf-8")
        lines += [(ln.strip(), lab) for ln in text.split("\n") if ln.strip()]
    assert sorted((e.text, e.label) for e in a.train + a.dev + a.test) == sorted(lines)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(DataError, match="conll2003"):
        load_dataset("no_such_set")


def test_missing_files_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "ner/conll2003/train.txt"))):
        load_dataset("conll2003", root=tmp_path)


def test_pairs_and_raw(shared_data: Path) -> None:
    counts = {"mrpc": 2753, "paws": 3539}
    for name in ("mrpc", "paws", "stsb", "snli", "mnli", "wordnet_gloss"):
        pairs = load_pairs(name)
        assert pairs and all(isinstance(p, PairExample) and p.anchor and p.positive for p in pairs)
        assert not any("\r" in p.positive or "\ufeff" in p.anchor for p in pairs)
        if name in counts:
            assert len(pairs) == counts[name]
    assert load_pairs("wordnet_gloss")[0].anchor != "sentence"  # header skipped
    assert len(load_raw_sentences("brown")) == 56283
    assert len(load_raw_sentences("nlp_corpus")) == 100000
    with pytest.raises(DataError):
        load_pairs("qqp")


# ----------------------------------------------------------------------------- generic readers

def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_read_conll_basics(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.conll",
               "-DOCSTART- -X- -X- O\n\nJohn\tB-PER\nlives\tO\n\tO\nin\tO\nNew York\tB-LOC\n\r\n"
               "Paris\tI-LOC\nis\tO\nbig\tI-MISC")  # no final newline, CRLF blank, IOB1
    exs = read_conll(p)
    assert exs == [NerExample(("John", "lives", "in", "New York"), ("B-PER", "O", "O", "B-LOC")),
                   NerExample(("Paris", "is", "big"), ("B-LOC", "O", "B-MISC"))]
    p2 = _write(tmp_path / "b.txt", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n")
    assert read_conll(p2) == [NerExample(("EU", "rejects"), ("B-ORG", "O"))]
    p3 = _write(tmp_path / "c.txt", "B-ORG|EU\nO|rejects\n")
    assert read_conll(p3, token_col=1, tag_col=0, sep="|")[0].tokens == ("EU", "rejects")


def test_conll_errors(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.conll", "a\tO\nb\tO\tX\n")
    with pytest.raises(DataError, match=r"bad\.conll:2: 3 columns; expected 2"):
        read_conll(p)
    p = _write(tmp_path / "tag.conll", "a\tO\n\nb\tPER\n")
    with pytest.raises(DataError, match=r"tag\.conll:3: invalid tag 'PER'"):
        read_conll(p)
    p = _write(tmp_path / "one.conll", "a\nb\n")
    with pytest.raises(DataError, match=r"one\.conll:1"):
        read_conll(p)
    p = _write(tmp_path / "empty.conll", "\n\n")
    with pytest.raises(DataError, match=r"empty\.conll:1: file is empty"):
        read_conll(p)
    p = _write(tmp_path / "enc.conll", "a\tO\nb\xe9\tO\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"enc\.conll:2: invalid UTF-8"):
        read_conll(p)
    with pytest.raises(DataError, match="file not found"):
        read_conll(tmp_path / "missing.conll")


def test_jsonl_ner(tmp_path: Path) -> None:
    rows = [{"tokens": ["a", "b"], "tags": ["I-X", "I-X"]}, {"tokens": ["c"], "tags": ["O"]}]
    p = _write(tmp_path / "n.jsonl", "\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_jsonl_ner(p)[0] == NerExample(("a", "b"), ("B-X", "I-X"))
    p = _write(tmp_path / "m.jsonl", json.dumps(rows[1]) + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}))
    with pytest.raises(DataError, match=r"m\.jsonl:2: 2 tokens but 1 tags"):
        read_jsonl_ner(p)
    p = _write(tmp_path / "j.jsonl", json.dumps(rows[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        read_jsonl_ner(p)
    p = _write(tmp_path / "t.jsonl", json.dumps({"tokens": ["a"], "tags": ["X-1"]}))
    with pytest.raises(DataError, match=r"t\.jsonl:1: invalid tag"):
        read_jsonl_ner(p)


def test_jsonl_tc_and_csv(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.jsonl", '{"text": "hi", "label": "pos"}\n{"text": "yo", "label": 3}\n')
    assert read_jsonl_tc(p) == [TcExample("hi", "pos"), TcExample("yo", "3")]
    p = _write(tmp_path / "bad.jsonl", '{"text": "hi", "label": "pos"}\n{"txt": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_jsonl_tc(p)
    p = _write(tmp_path / "c.csv", 'id,text,label\r\n1,"hello, ""world""",pos\r\n2,"multi\nline",neg\r\n')
    assert read_csv_tc(p) == [TcExample('hello, "world"', "pos"), TcExample("multi\nline", "neg")]
    p = _write(tmp_path / "cols.csv", "text,label\na,pos\nb,neg,extra\n")
    with pytest.raises(DataError, match=r"cols\.csv:3: 3 columns; expected 2"):
        read_csv_tc(p)
    p = _write(tmp_path / "hdr.csv", "sentence,label\na,pos\n")
    with pytest.raises(DataError, match=r"hdr\.csv:1: .*no column 'text'"):
        read_csv_tc(p)
    p = _write(tmp_path / "enc.csv", b"text,label\nok,pos\nbad \xff,neg\n")
    with pytest.raises(DataError, match=r"enc\.csv:3: invalid UTF-8"):
        read_csv_tc(p)
    p = _write(tmp_path / "e.csv", b"")
    with pytest.raises(DataError, match=r"e\.csv:1: file is empty"):
        read_csv_tc(p)


# ----------------------------------------------------------------------------- encodings
# Every reader of user files (and the registry readers, which take any data root) goes
# through one decoder; each is tested here on its own so a reader that ever reads bytes
# another way is caught. Line 2 holds the only non-ASCII text, "Zoë".

def _read_raw(path: Path) -> list:
    return load_raw_sentences("brown", root=path.parents[2])


def _read_pairs(path: Path) -> list:
    return load_pairs("wordnet_gloss", root=path.parents[2])


ENCODING_READERS = {  # reader, file path under tmp_path, UTF-8 text
    "conll": (read_conll, "user.conll", "Hi\tO\nZoë\tB-PER\n"),
    "jsonl_ner": (read_jsonl_ner, "user.jsonl", '{"tokens": ["Hi"], "tags": ["O"]}\n'
                  '{"tokens": ["Zoë"], "tags": ["B-PER"]}\n'),
    "jsonl_tc": (read_jsonl_tc, "user.jsonl", '{"text": "Hi", "label": "a"}\n{"text": "Zoë", "label": "b"}\n'),
    "csv": (read_csv_tc, "user.csv", "text,label\nZoë,b\n"),
    "raw": (_read_raw, "raw/brown/sentences.txt", "Hi there.\nZoë ran.\n"),
    "pairs": (_read_pairs, "pairs/wordnet_gloss/pairs.tsv", "word\tgloss\nZoë\ta name\n"),
}


@pytest.mark.parametrize("reader", sorted(ENCODING_READERS))
def test_every_reader_refuses_files_that_are_not_utf8(reader: str, tmp_path: Path) -> None:
    read, rel, text = ENCODING_READERS[reader]
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    expected = read(_write(path, text))

    # UTF-16 with its byte order mark (what "Save as Unicode" writes): refused at line 1.
    for encoding, name in (("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")):
        bom = "\ufeff".encode(encoding)
        _write(path, bom + text.encode(encoding))
        with pytest.raises(DataError) as exc:
            read(path)
        assert str(exc.value).startswith(f"{path}:1: the file is {name} (byte order mark {bom.hex(' ')} "
                                         "at byte offset 0), not UTF-8; expected UTF-8 text"), exc.value

    # UTF-16 without a byte order mark decodes as "valid" UTF-8 full of NULs: refused too.
    _write(path, text.encode("utf-16-le"))
    with pytest.raises(DataError, match=re.escape(f"{path}:1: NUL byte at byte offset 1: the file is not UTF-8")):
        read(path)

    # Latin-1: the "ë" byte is invalid UTF-8; the line and byte offset point at it.
    raw = text.encode("latin-1")
    _write(path, raw)
    with pytest.raises(DataError) as exc:
        read(path)
    offset = raw.index(b"\xeb")
    assert str(exc.value).startswith(f"{path}:2: invalid UTF-8 byte 0xeb at byte offset {offset}: "
                                     "the file is not UTF-8"), exc.value

    # A UTF-8 byte order mark is accepted and dropped: the same examples as without it
    # (it never becomes part of the first token, JSON object or CSV header).
    _write(path, b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read(path) == expected
    _write(path, b"\xef\xbb\xbf" + raw)  # ... and the offset still counts from the file's start
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid UTF-8 byte 0xeb at byte offset {offset + 3}:")):
        read(path)


def test_load_user_dataset(tmp_path: Path) -> None:
    tr = _write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    te = _write(tmp_path / "test.jsonl", '{"text": "c", "label": "pos"}\n')
    ds = load_user_dataset("tc", tr, te)
    assert ds.kind == "tc" and ds.labels == ("neg", "pos") and ds.dev == () and len(ds.train) == 2
    ner_tr = _write(tmp_path / "train.bio", "a\tB-X\n\nb\tO\n")
    ner_te = _write(tmp_path / "test.tsv", "c\tI-Y\n")
    ds = load_user_dataset("ner", ner_tr, ner_te, dev=ner_te)
    assert ds.labels == ("X", "Y") and ds.test[0].tags == ("B-Y",) and len(ds.dev) == 1
    with pytest.raises(DataError, match="not supported"):
        load_user_dataset("ner", tr, te)
    with pytest.raises(DataError):
        load_user_dataset("qa", tr, te)


def test_unknown_label_in_fixed_label_set(tmp_path: Path, shared_data: Path) -> None:
    """A label outside the dataset's fixed set (tweeteval mapping.txt, sst) names file+line."""
    src = shared_data / "tc/tweeteval/stance_climate"
    dst = tmp_path / "tc/tweeteval/stance_climate"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    labels = (dst / "val_labels.txt").read_text().split("\n")
    labels[4] = "7"
    (dst / "val_labels.txt").write_text("\n".join(labels))
    with pytest.raises(DataError, match=r"val_labels\.txt:5: unknown label '7'"):
        load_dataset("tweeteval_stance_climate", root=tmp_path)
    sst = tmp_path / "tc/sst2"
    sst.mkdir(parents=True)
    for s in ("train", "dev", "test"):
        _write(sst / f"stsa.binary.{s}", "1 good\n0 bad\n")
    _write(sst / "stsa.binary.dev", "1 good\n2 odd\n")
    with pytest.raises(DataError, match=r"stsa\.binary\.dev:2: unknown label '2'"):
        load_dataset("sst2", root=tmp_path)


# ----------------------------------------------------------------------------- IOB helpers

def test_entity_types() -> None:
    assert entity_types(["O", "B-PER", "I-PER", "B-LOC"]) == ("LOC", "PER")
    assert entity_types([("B-b",), ("I-a", "O")]) == ("a", "b")


@given(st.lists(st.sampled_from(["O", "B-A", "I-A", "B-B", "I-B"]), max_size=20))
def test_to_iob2_properties(tags: list[str]) -> None:
    out = to_iob2(tags)
    assert len(out) == len(tags) and to_iob2(out) == out
    assert entity_types(out) == entity_types(tags)
    for prev, cur in zip(("O",) + out, out):
        if cur.startswith("I-"):
            assert prev[2:] == cur[2:] and prev != "O"


def test_label_pair_sources_are_held_out_of_the_tc_suite(shared_data: Path) -> None:
    """Pre-finetuning's labelled pair sets share no text with any split of the study's TC sets."""
    from mtpf_training.compare import DEFAULT_TC
    from mtpf_training.pretrain import LABEL_PAIR_SOURCES

    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", s.lower()).strip()

    assert not set(LABEL_PAIR_SOURCES) & set(DEFAULT_TC)
    seen = {norm(ex.text) for n in LABEL_PAIR_SOURCES for ex in load_dataset(n, shared_data).train}
    assert len(seen) > 50000
    for name in DEFAULT_TC:
        ds = load_dataset(name, shared_data)
        shared = [ex.text for split in (ds.train, ds.dev, ds.test) for ex in split if norm(ex.text) in seen]
        assert not shared, f"{name}: {len(shared)} texts also in a label pair source, e.g. {shared[:2]}"
