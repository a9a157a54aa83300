"""Dataset readers for mtpf: every dataset under ``shared/data`` behind one registry,
plus generic readers for users' own NER / text-classification (TC) data.

Data are never copied into the project: they are read from :func:`data_root`
(env ``MTPF_DATA``, else ``<repo>/../shared/data``; see ``SOURCES.md`` there).
Pure Python + numpy, so the runtime/tests can use it without torch.

Generic user formats
--------------------
* **CoNLL** (``.conll``, ``.txt``, ``.tsv``, ``.bio``): one token per line, sentences
  separated by blank lines, ``-DOCSTART-`` lines skipped.  Columns are split on TAB if
  the line contains a TAB, else on whitespace (or on ``sep`` if given); the token is
  column ``token_col`` (default 0), the tag column ``tag_col`` (default last).  Every
  line of a file must have the same number of columns.  Tags are BIO: ``O``, ``B-X``,
  ``I-X``; IOB1 input (an ``I-X`` opening an entity) is repaired to IOB2 by
  :func:`to_iob2`.  Tokens that are empty after stripping are dropped with their tag.
* **JSONL NER** (``.jsonl``): one object per line, ``{"tokens": [...], "tags": [...]}``.
* **JSONL TC** (``.jsonl``): one object per line, ``{"text": "...", "label": "..."}``.
* **CSV TC** (``.csv``): header row required; columns ``text`` and ``label`` by default.

All files are UTF-8; CRLF line ends are accepted, and so is a UTF-8 byte order mark (what
Windows tools write as "UTF-8 with BOM"), which is dropped.  UTF-16/UTF-32 files (with a
BOM, or recognised by NUL bytes) and anything that is not valid UTF-8 (Latin-1,
Windows-1252) are refused, never guessed.  Any problem raises :class:`DataError` naming the
file, the 1-based line (and the byte offset for encoding errors), what was wrong and what
was expected.

Splits
------
Official splits are used where they exist.  A missing dev split stays empty (never
carved from train).  Datasets with no test split (mr, cr, subj, mpqa, ag_news [only
test.csv is stored], sms_spam, imdb) are shuffled with
``numpy.random.default_rng(0).permutation`` and cut into 80 % train / 10 % dev /
10 % test (``n_train = int(0.8 n)``, ``n_dev = int(0.1 n)``, test = the rest); the
examples are permuted in reading order (files in label order, lines in file order).
``tweeteval_sentiment`` has no stored train text: its val split is used as train,
its test as test, dev is empty.

TC label order (``Dataset.labels``): sst2/mr/cr/mpqa/imdb ``negative, positive``;
sst5 ``very negative … very positive``; subj ``objective, subjective``; trec
``ABBR DESC ENTY HUM LOC NUM``; ag_news = classes.txt order; emotion = dair-ai index
order ``sadness joy love anger fear surprise``; sms_spam ``ham, spam``; 20newsgroups =
sorted group names; tweeteval = mapping.txt index order.  User TC data: sorted labels.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "NerExample", "TcExample", "PairExample", "Dataset", "DataError", "data_root",
    "available_datasets", "load_dataset", "load_pairs", "load_raw_sentences",
    "read_conll", "read_jsonl_ner", "read_jsonl_tc", "read_csv_tc",
    "load_user_dataset", "entity_types", "to_iob2",
]


@dataclass(frozen=True)
class NerExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]  # BIO (IOB2) tags, same length as tokens


@dataclass(frozen=True)
class TcExample:
    text: str
    label: str  # human-readable class name


@dataclass(frozen=True)
class PairExample:
    anchor: str
    positive: str


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # "ner" | "tc"
    train: tuple
    dev: tuple
    test: tuple
    labels: tuple[str, ...]
    split_note: str


class DataError(ValueError):
    """Bad or missing data; the message names file, line, problem and expectation."""


def _err(path: Path | str, line: int | None, what: str, expected: str | None = None) -> DataError:
    where = f"{path}:{line}" if line is not None else f"{path}"
    msg = f"{where}: {what}"
    if expected:
        msg += f"; expected {expected}"
    return DataError(msg)


def data_root() -> Path:
    """Where the shared datasets live; not checked here so imports never fail."""
    env = os.environ.get("MTPF_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- reading

# Byte order marks of the encodings a "Save as Unicode" produces; UTF-32 LE first, since
# its mark begins with UTF-16 LE's.
_FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"),
                 (b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE"))
_CONVERT = "UTF-8 text (convert it, e.g. iconv -f {src} -t UTF-8 IN > OUT)"


def _decode(raw: bytes, path: Path, latin1: bool) -> str:
    """UTF-8 text of ``raw`` (a UTF-8 BOM is dropped); anything else is a DataError.

    A UTF-8 BOM is accepted because Windows tools ("UTF-8 with BOM", Excel's "CSV UTF-8")
    write it; it never reaches the first token or the CSV header. UTF-16/32 (with a BOM,
    or betrayed by NUL bytes) and invalid UTF-8 name the line and byte offset and say the
    file is not UTF-8: decoding them as something else would feed mojibake to training.
    ``latin1`` (only for files SOURCES.md lists as Latin-1) decodes invalid UTF-8 as Latin-1.
    """
    for bom, name in _FOREIGN_BOMS:
        if raw.startswith(bom):
            raise _err(path, 1, f"the file is {name} (byte order mark {bom.hex(' ')} at byte offset 0), "
                       "not UTF-8", _CONVERT.format(src=name.split()[0]))
    skipped = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    raw = raw[skipped:]
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _err(path, raw[:nul].count(b"\n") + 1,
                   f"NUL byte at byte offset {nul + skipped}: the file is not UTF-8 (UTF-16 without a BOM?)",
                   _CONVERT.format(src="UTF-16LE"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if latin1:
            return raw.decode("latin-1")
        line = raw[: exc.start].count(b"\n") + 1
        raise _err(path, line, f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at byte offset "
                   f"{exc.start + skipped}: the file is not UTF-8 (Latin-1?)",
                   "UTF-8 text (convert it, e.g. iconv -f WINDOWS-1252 -t UTF-8 IN > OUT: "
                   "it reads Latin-1 too)") from None


def _read_lines(path: Path | str, latin1: bool = False) -> list[str]:
    """Decode a text file into lines (BOM, CRLF, missing final newline handled).

    UTF-8 is required unless ``latin1`` is set (see :func:`_decode`), so silent mojibake
    cannot creep into user data.
    """
    path = Path(path)
    if not path.is_file():
        raise _err(path, None, "file not found", "an existing file")
    lines = _decode(path.read_bytes(), path, latin1).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not any(ln.strip() for ln in lines):
        raise _err(path, 1, "file is empty", "at least one data line")
    return lines


_TAG_RE = re.compile(r"^(O|[BI]-.+)$")


def _check_tag(tag: str, path: Path | str, line: int | None) -> None:
    if not _TAG_RE.match(tag):
        raise _err(path, line, f"invalid tag {tag!r}", "O, B-<type> or I-<type>")


def to_iob2(tags: Sequence[str]) -> tuple[str, ...]:
    """Repair IOB1 to IOB2: an ``I-X`` that opens an entity becomes ``B-X``."""
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return tuple(out)


def entity_types(tags: Iterable[Any]) -> tuple[str, ...]:
    """Sorted entity types in tags; accepts tags, tag sequences or NerExamples."""
    types: set[str] = set()
    for item in tags:
        seq = item.tags if isinstance(item, NerExample) else ([item] if isinstance(item, str) else item)
        for tag in seq:
            if tag != "O":
                types.add(tag[2:])
    return tuple(sorted(types))


def read_conll(path: Path | str, token_col: int = 0, tag_col: int = -1,
               sep: str | None = None) -> list[NerExample]:
    """Read a CoNLL-style file (see module docstring)."""
    return _parse_conll(_read_lines(path), path, token_col, tag_col, sep)


def _parse_conll(lines: list[str], path: Path | str, token_col: int, tag_col: int,
                 sep: str | None) -> list[NerExample]:
    out: list[NerExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    ncols: int | None = None
    first_line = 0
    good_tags: set[str] = set()

    def flush() -> None:
        if tokens:
            out.append(NerExample(tuple(tokens), to_iob2(tags)))
        tokens.clear()
        tags.clear()

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            flush()
            continue
        if line.split(None, 1)[0] == "-DOCSTART-":
            flush()
            continue
        if sep is None:
            cols = line.split("\t") if "\t" in line else line.split()
        else:
            cols = line.split(sep)
        if ncols is None:
            ncols, first_line = len(cols), lineno
            if ncols < 2 or not (-ncols <= token_col < ncols and -ncols <= tag_col < ncols):
                raise _err(path, lineno, f"{ncols} column(s), token column {token_col} and "
                           f"tag column {tag_col} do not fit",
                           "a token column and a tag column")
        elif len(cols) != ncols:
            raise _err(path, lineno, f"{len(cols)} columns",
                       f"{ncols} columns as on line {first_line}")
        tag = cols[tag_col].strip()
        if tag not in good_tags:
            _check_tag(tag, path, lineno)
            good_tags.add(tag)
        token = cols[token_col].strip()
        if not token:  # BTC has empty tokens: drop them, keeping tags aligned
            continue
        tokens.append(token)
        tags.append(tag)
    flush()
    if not out:
        raise _err(path, None, "no sentences found", "token/tag lines")
    return out


def _json_lines(path: Path | str) -> Iterable[tuple[int, dict]]:
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _err(path, lineno, f"invalid JSON ({exc.msg})", "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise _err(path, lineno, f"JSON {type(obj).__name__}", "a JSON object")
        yield lineno, obj


def read_jsonl_ner(path: Path | str) -> list[NerExample]:
    """Read ``{"tokens": [...], "tags": [...]}`` per line."""
    out = []
    for lineno, obj in _json_lines(path):
        toks, tags = obj.get("tokens"), obj.get("tags")
        if not (isinstance(toks, list) and isinstance(tags, list)
                and all(isinstance(x, str) for x in toks + tags)):
            raise _err(path, lineno, "missing or non-string 'tokens'/'tags'",
                       'lists of strings under "tokens" and "tags"')
        if len(toks) != len(tags):
            raise _err(path, lineno, f"{len(toks)} tokens but {len(tags)} tags",
                       "as many tags as tokens")
        for tag in tags:
            _check_tag(tag, path, lineno)
        if toks:
            out.append(NerExample(tuple(toks), to_iob2(tags)))
    return out


def read_jsonl_tc(path: Path | str) -> list[TcExample]:
    """Read ``{"text": ..., "label": ...}`` per line (an int label becomes its string)."""
    out = []
    for lineno, obj in _json_lines(path):
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not isinstance(label, (str, int)) or isinstance(label, bool):
            raise _err(path, lineno, "missing or wrongly typed 'text'/'label'",
                       'a string "text" and a string or integer "label"')
        out.append(TcExample(text, str(label)))
    return out


def read_csv_tc(path: Path | str, text_col: str = "text", label_col: str = "label") -> list[TcExample]:
    """Read a CSV file with a header row naming the text and label columns."""
    lines = _read_lines(path)
    reader = csv.reader(io.StringIO("\n".join(lines) + "\n", newline=""))
    header = next(reader)
    for col in (text_col, label_col):
        if col not in header:
            raise _err(path, 1, f"header {header} has no column {col!r}",
                       f"a header row with {text_col!r} and {label_col!r}")
    ti, li = header.index(text_col), header.index(label_col)
    out = []
    for row in reader:
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise _err(path, reader.line_num, f"{len(row)} columns", f"{len(header)} columns as in the header")
        out.append(TcExample(row[ti], row[li]))
    return out


_EXT_FMT = {".conll": "conll", ".txt": "conll", ".tsv": "conll", ".bio": "conll",
            ".jsonl": "jsonl", ".csv": "csv"}


def load_user_dataset(kind: str, train: Path | str, test: Path | str,
                      dev: Path | str | None = None, fmt: str | None = None) -> Dataset:
    """Build a Dataset from user files; fmt is inferred per file from its extension."""
    if kind not in ("ner", "tc"):
        raise DataError(f"unknown kind {kind!r}; expected 'ner' or 'tc'")

    def read(path: Path | str) -> tuple:
        f = fmt or _EXT_FMT.get(Path(path).suffix.lower())
        readers: dict[tuple[str, str | None], Callable[[Any], list]] = {
            ("ner", "conll"): read_conll, ("ner", "jsonl"): read_jsonl_ner,
            ("tc", "jsonl"): read_jsonl_tc, ("tc", "csv"): read_csv_tc}
        if (kind, f) not in readers:
            raise _err(path, None, f"format {f!r} not supported for kind {kind!r}",
                       "ner: conll/jsonl, tc: jsonl/csv (by extension or fmt=)")
        return tuple(readers[(kind, f)](path))

    tr, te = read(train), read(test)
    dv = read(dev) if dev is not None else ()
    if not tr or not te:
        raise _err(train if not tr else test, None, "no examples", "at least one example")
    if kind == "ner":
        labels = entity_types(tr + dv + te)
    else:
        labels = tuple(sorted({ex.label for ex in tr + dv + te}))
    note = f"user files: train={train}, dev={dev or '-'}, test={test}"
    return Dataset(f"user:{Path(train).stem}", kind, tr, dv, te, labels, note)


# --------------------------------------------------------------------------- helpers

def _seeded_split(examples: Sequence) -> tuple[tuple, tuple, tuple]:
    """Deterministic 80/10/10 split (rng seed 0) for datasets without a test split."""
    n = len(examples)
    perm = np.random.default_rng(0).permutation(n)
    shuffled = [examples[i] for i in perm]
    n_train, n_dev = int(0.8 * n), int(0.1 * n)
    return (tuple(shuffled[:n_train]), tuple(shuffled[n_train:n_train + n_dev]),
            tuple(shuffled[n_train + n_dev:]))


_SEEDED_NOTE = "no official split: seeded 80-10-10 split (numpy default_rng(0) permutation)"


def _tc_lines(path: Path, labels: tuple[str, ...], parse: Callable[[str], tuple[str, str]],
              latin1: bool = False, skip_header: str | None = None) -> list[TcExample]:
    """Parse one-example-per-line TC files; parse(line) -> (label, text)."""
    out = []
    for lineno, line in enumerate(_read_lines(path, latin1), 1):
        if lineno == 1 and skip_header is not None and line.strip() == skip_header:
            continue
        if not line.strip():
            continue
        try:
            label, text = parse(line)
        except ValueError as exc:
            raise _err(path, lineno, f"malformed line ({exc})", "<label> and <text>") from None
        if label not in labels:
            raise _err(path, lineno, f"unknown label {label!r}", f"one of {list(labels)}")
        text = text.strip()
        if text:
            out.append(TcExample(text, label))
    return out


def _split_first(sep: str | None, names: dict[str, str] | None = None) -> Callable[[str], tuple[str, str]]:
    def parse(line: str) -> tuple[str, str]:
        parts = line.split(sep, 1)
        if len(parts) != 2:
            raise ValueError("no separator between label and text")
        return (names.get(parts[0], parts[0]) if names else parts[0]), parts[1]
    return parse


def _by_file(files: Sequence[tuple[Path, str, bool]]) -> list[TcExample]:
    """One sentence per line, label given by the file (mr, cr, subj, mpqa)."""
    labels = tuple(lab for _, lab, _ in files)
    return [ex for path, lab, latin1 in files
            for ex in _tc_lines(path, labels, lambda s, lab=lab: (lab, s), latin1)]


# --------------------------------------------------------------------------- NER registry

_CROSSNER = ("politics", "science", "music", "literature", "ai")

_NER: dict[str, tuple[str, str, str | None, str, str | None]] = {
    # name: (dir, train, dev, test, sep)
    "conll2003": ("ner/conll2003", "train.txt", "dev.txt", "test.txt", None),
    "wnut17": ("ner/wnut17", "wnut17train.conll", "emerging.dev.conll", "emerging.test.annotated", "\t"),
    "btc": ("ner/btc", "btc.train", "btc.dev", "btc.test", "\t"),
    "tweebank_ner": ("ner/tweebank_ner", "train.bio", "dev.bio", "test.bio", None),
    "bc5cdr": ("ner/bc5cdr", "train.tsv", "devel.tsv", "test.tsv", "\t"),
    "ncbi_disease": ("ner/ncbi_disease", "train.tsv", "devel.tsv", "test.tsv", "\t"),
    **{f"crossner_{d}": (f"ner/crossner/{d}", "train.txt", "dev.txt", "test.txt", "\t") for d in _CROSSNER},
    # MIT Movie: eng is TAB-separated, trivia10k13 is space-separated (sep=None handles both)
    "mit_movie_eng": ("ner/mit_movie", "engtrain.bio.txt", None, "engtest.bio.txt", None),
    "mit_movie_trivia": ("ner/mit_movie", "trivia10k13train.bio.txt", None, "trivia10k13test.bio.txt", None),
}


def _load_ner(name: str, root: Path) -> Dataset:
    d, tr, dv, te, sep = _NER[name]
    base = root / d
    read = lambda f: tuple(_parse_conll(_read_lines(base / f), base / f, 0, -1, sep))  # noqa: E731
    train, test = read(tr), read(te)
    dev = read(dv) if dv else ()
    note = "official train/dev/test" if dv else "official train/test; no dev split (dev empty)"
    return Dataset(name, "ner", train, dev, test, entity_types(train + dev + test), note)


# --------------------------------------------------------------------------- TC registry

_NEGPOS = ("negative", "positive")
_SST5 = ("very negative", "negative", "neutral", "positive", "very positive")
_TREC = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
_EMOTION = ("sadness", "joy", "love", "anger", "fear", "surprise")
_TWEETEVAL = ("emoji", "emotion", "hate", "irony", "offensive", "sentiment", "stance_abortion",
              "stance_atheism", "stance_climate", "stance_feminist", "stance_hillary")


def _sst(root: Path, name: str) -> Dataset:
    fine = name == "sst5"
    labels = _SST5 if fine else _NEGPOS
    names = {str(i): lab for i, lab in enumerate(labels)}
    stem = "stsa.fine" if fine else "stsa.binary"
    split = [tuple(_tc_lines(root / f"tc/{name}/{stem}.{s}", labels, _split_first(" ", names)))
             for s in ("train", "dev", "test")]
    return Dataset(name, "tc", *split, labels, "official train/dev/test")


def _trec(root: Path, name: str) -> Dataset:
    def parse(line: str) -> tuple[str, str]:
        label, text = _split_first(" ")(line)
        if ":" not in label:
            raise ValueError("label has no ':'")
        return label.split(":", 1)[0], text
    d = root / "tc/trec"
    train = tuple(_tc_lines(d / "TREC.train", _TREC, parse, latin1=True))
    test = tuple(_tc_lines(d / "TREC.test", _TREC, parse))
    return Dataset(name, "tc", train, (), test, _TREC,
                   "official train/test, 6 coarse labels; no dev split (dev empty)")


def _seeded(name: str, labels: tuple[str, ...], examples: list[TcExample]) -> Dataset:
    return Dataset(name, "tc", *_seeded_split(examples), labels, _SEEDED_NOTE)


def _mr(root: Path, name: str) -> Dataset:
    d = root / "tc/mr"
    return _seeded(name, _NEGPOS, _by_file([(d / "rt-polarity.neg", "negative", True),
                                            (d / "rt-polarity.pos", "positive", True)]))


def _cr(root: Path, name: str) -> Dataset:
    d = root / "tc/cr"
    return _seeded(name, _NEGPOS, _by_file([(d / "custrev.neg", "negative", False),
                                            (d / "custrev.pos", "positive", False)]))


def _mpqa(root: Path, name: str) -> Dataset:
    d = root / "tc/mpqa"
    return _seeded(name, _NEGPOS, _by_file([(d / "mpqa.neg", "negative", False),
                                            (d / "mpqa.pos", "positive", False)]))


def _subj(root: Path, name: str) -> Dataset:
    d = root / "tc/subj"
    return _seeded(name, ("objective", "subjective"),
                   _by_file([(d / "subj.objective", "objective", False),
                             (d / "subj.subjective", "subjective", True)]))


def _ag_news(root: Path, name: str) -> Dataset:
    d = root / "tc/ag_news"
    labels = tuple(ln.strip() for ln in _read_lines(d / "classes.txt") if ln.strip())
    path = d / "test.csv"
    reader = csv.reader(io.StringIO("\n".join(_read_lines(path)) + "\n", newline=""))
    out = []
    for row in reader:
        if len(row) != 3:
            raise _err(path, reader.line_num, f"{len(row)} columns", '3 columns "class","title","description"')
        if not row[0].isdigit() or not 1 <= int(row[0]) <= len(labels):
            raise _err(path, reader.line_num, f"unknown label {row[0]!r}", f"1..{len(labels)} (classes.txt)")
        # backslash stands for a newline in this release; "\$" is an escaped dollar
        text = f"{row[1]} {row[2]}".replace("\\$", "$").replace("\\", " ")
        out.append(TcExample(" ".join(text.split()), labels[int(row[0]) - 1]))
    return Dataset(name, "tc", *_seeded_split(out), labels,
                   "only the official test.csv is stored: " + _SEEDED_NOTE)


def _emotion(root: Path, name: str) -> Dataset:
    def parse(line: str) -> tuple[str, str]:
        if ";" not in line:
            raise ValueError("no ';' before the label")
        text, label = line.rsplit(";", 1)
        return label.strip(), text
    d = root / "tc/emotion"
    split = [tuple(_tc_lines(d / f"{s}.txt", _EMOTION, parse, skip_header="text;label_name"))
             for s in ("train", "val", "test")]
    return Dataset(name, "tc", *split, _EMOTION, "official train/val/test (val used as dev)")


def _sms_spam(root: Path, name: str) -> Dataset:
    labels = ("ham", "spam")
    return _seeded(name, labels, _tc_lines(root / "tc/sms_spam/SMSSpamCollection", labels, _split_first("\t")))


def _imdb(root: Path, name: str) -> Dataset:
    names = {"0": "negative", "1": "positive"}
    ex = _tc_lines(root / "tc/imdb_subset/imdb", _NEGPOS, _split_first(" ", names))
    return Dataset(name, "tc", *_seeded_split(ex), _NEGPOS,
                   "TextFooler 1000-example subset; " + _SEEDED_NOTE)


def _newsgroups(root: Path, name: str) -> Dataset:
    base = root / "tc/20newsgroups_subset"
    splits = []
    for split in ("20news-bydate-train", "20news-bydate-test"):
        d = base / split
        if not d.is_dir():
            raise _err(d, None, "directory not found", "one sub-directory per newsgroup")
        out = []
        for group in sorted(p for p in d.iterdir() if p.is_dir()):
            files = sorted((p for p in group.iterdir() if p.is_file()),
                           key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
            for f in files:
                lines = _read_lines(f, latin1=True)
                blank = next((i for i, ln in enumerate(lines) if not ln.strip()), len(lines))
                body = "\n".join(lines[blank + 1:]).strip()
                if body:  # 4 messages are header-only
                    out.append(TcExample(body, group.name))
        splits.append(tuple(out))
    labels = tuple(sorted({ex.label for ex in splits[0]}))
    return Dataset(name, "tc", splits[0], (), splits[1], labels,
                   "bydate train/test subset (100 messages per group per split); no dev split (dev empty)")


def _mapping(path: Path) -> tuple[str, ...]:
    """Parse tweeteval mapping.txt: ``<idx>\\t<name>`` (emoji: ``<idx>\\t<emoji>\\t<name>\\t``)."""
    names: list[str] = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        cols = [c for c in line.split("\t") if c.strip()]
        if len(cols) < 2 or cols[0].strip() != str(len(names)):
            raise _err(path, lineno, f"malformed mapping line {line!r}", f"'{len(names)}<TAB><name>'")
        names.append(cols[-1].strip().strip("_"))
    return tuple(names)


def _tweeteval_split(d: Path, split: str, labels: tuple[str, ...]) -> tuple[TcExample, ...]:
    texts, lab_path = _read_lines(d / f"{split}_text.txt"), d / f"{split}_labels.txt"
    labs = _read_lines(lab_path)
    if len(texts) != len(labs):
        raise _err(lab_path, None, f"{len(labs)} labels for {len(texts)} texts in {split}_text.txt",
                   "one label line per text line")
    out = []
    for lineno, (text, lab) in enumerate(zip(texts, labs), 1):
        lab = lab.strip()
        if not lab.isdigit() or int(lab) >= len(labels):
            raise _err(lab_path, lineno, f"unknown label {lab!r}", f"0..{len(labels) - 1} (mapping.txt)")
        if text.strip():  # hate has 8 empty tweets: dropped with their labels
            out.append(TcExample(text.strip(), labels[int(lab)]))
    return tuple(out)


def _tweeteval(root: Path, name: str) -> Dataset:
    task = name[len("tweeteval_"):]
    d = root / "tc/tweeteval" / task
    labels = _mapping(d / "mapping.txt")
    test = _tweeteval_split(d, "test", labels)
    if task == "sentiment":
        return Dataset(name, "tc", _tweeteval_split(d, "val", labels), (), test, labels,
                       "train text not stored: official val used as train, official test as test, dev empty")
    return Dataset(name, "tc", _tweeteval_split(d, "train", labels), _tweeteval_split(d, "val", labels),
                   test, labels, "official train/val/test (val used as dev)")


_TC: dict[str, Callable[[Path, str], Dataset]] = {
    "sst2": _sst, "sst5": _sst, "trec": _trec, "mr": _mr, "cr": _cr, "subj": _subj, "mpqa": _mpqa,
    "ag_news": _ag_news, "emotion": _emotion, "sms_spam": _sms_spam, "imdb": _imdb,
    "20newsgroups": _newsgroups, **{f"tweeteval_{t}": _tweeteval for t in _TWEETEVAL},
}


def available_datasets() -> dict[str, str]:
    """Registry name -> kind ("ner" or "tc")."""
    return {**{n: "ner" for n in _NER}, **{n: "tc" for n in _TC}}


def load_dataset(name: str, root: Path | str | None = None) -> Dataset:
    """Load a registered dataset from the shared data folder."""
    root = Path(root) if root is not None else data_root()
    if name in _NER:
        return _load_ner(name, root)
    if name in _TC:
        return _TC[name](root, name)
    raise DataError(f"unknown dataset {name!r}; expected one of {sorted(available_datasets())}")


# --------------------------------------------------------------------------- pairs / raw

def _tsv_rows(path: Path, min_cols: int, header: bool = False) -> Iterable[tuple[int, list[str]]]:
    """TAB-split rows (no CSV quoting: quotes in these files are literal)."""
    for lineno, line in enumerate(_read_lines(path), 1):
        if (header and lineno == 1) or not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < min_cols:
            raise _err(path, lineno, f"{len(cols)} TAB-separated columns", f"at least {min_cols}")
        yield lineno, cols


def _pairs_mrpc(root: Path) -> list[PairExample]:
    path = root / "pairs/mrpc/msr_paraphrase_train.txt"
    return [PairExample(c[3].strip(), c[4].strip()) for _, c in _tsv_rows(path, 5, header=True)
            if c[0].strip() == "1"]


def _pairs_paws(root: Path) -> list[PairExample]:
    path = root / "pairs/paws_wiki/dev.tsv"
    return [PairExample(c[1].strip(), c[2].strip()) for _, c in _tsv_rows(path, 4) if c[3].strip() == "1"]


def _pairs_stsb(root: Path) -> list[PairExample]:
    path = root / "pairs/stsb/sts-train.csv"
    out = []
    for lineno, c in _tsv_rows(path, 7):
        try:
            score = float(c[4])
        except ValueError:
            raise _err(path, lineno, f"score {c[4]!r} is not a number", "a score 0.0-5.0 in column 5") from None
        if score >= 4.0:
            out.append(PairExample(c[5].strip(), c[6].strip()))
    return out


def _pairs_nli(*paths: Path) -> list[PairExample]:
    return [PairExample(c[1].strip(), c[2].strip()) for p in paths for _, c in _tsv_rows(p, 3)
            if c[0].strip() == "entailment"]


_PAIRS: dict[str, Callable[[Path], list[PairExample]]] = {
    "mrpc": _pairs_mrpc,
    "paws": _pairs_paws,
    "stsb": _pairs_stsb,
    "snli": lambda r: _pairs_nli(r / "pairs/snli_subset/snli"),
    "mnli": lambda r: _pairs_nli(r / "pairs/mnli_subset/mnli_matched", r / "pairs/mnli_subset/mnli_mismatched"),
    "wordnet_gloss": lambda r: [PairExample(c[0].strip(), c[1].strip()) for _, c in
                                _tsv_rows(r / "pairs/wordnet_gloss/pairs.tsv", 2, header=True)],
}


def load_pairs(name: str, root: Path | str | None = None) -> list[PairExample]:
    """Positive sentence pairs for contrastive pre-finetuning."""
    if name not in _PAIRS:
        raise DataError(f"unknown pair source {name!r}; expected one of {sorted(_PAIRS)}")
    return _PAIRS[name](Path(root) if root is not None else data_root())


_RAW = {"nlp_corpus": "raw/nlp_corpus/sentences.txt", "brown": "raw/brown/sentences.txt"}


def load_raw_sentences(name: str, root: Path | str | None = None) -> list[str]:
    """Unlabelled sentences, one per non-blank line."""
    if name not in _RAW:
        raise DataError(f"unknown raw corpus {name!r}; expected one of {sorted(_RAW)}")
    path = (Path(root) if root is not None else data_root()) / _RAW[name]
    return [ln.strip() for ln in _read_lines(path) if ln.strip()]
