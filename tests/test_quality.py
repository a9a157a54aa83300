"""benchmarks/quality.py: the INT8 quality study scores tasks correctly, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("seqeval")

from ckpt_factory import make_checkpoint  # noqa: E402
from conftest import require_data  # noqa: E402
from mtpf_benchmarks.quality import load_task_data, main, score_ner, score_tc, word_tags  # noqa: E402
from mtpf_export.bundle import export_bundle  # noqa: E402
from mtpf_runtime import Runtime  # noqa: E402
from mtpf_runtime.decode import Entity  # noqa: E402

CONLL = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
TREC = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def _with_dataset(ckpt: Path, name: str, dataset: str) -> Path:
    f = ckpt / "tasks" / f"{name}.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "dataset": dataset}))
    return ckpt


def test_word_tags_maps_entities_back_to_words() -> None:
    words = ["Peter", "Blackburn", "met", "Angela", "Merkel", "in", "Berlin", "."]
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    ents = [Entity("PER", 0, 15, "Peter Blackburn", 0.9), Entity("PER", 20, 33, "Angela Merkel", 0.9),
            Entity("LOC", 37, 43, "Berlin", 0.8)]
    assert word_tags(ents, spans) == ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]
    assert word_tags([], spans) == ["O"] * len(words)


def test_study_end_to_end_scores_what_the_runtime_returns(tiny_bert: Path, tmp_path: Path) -> None:
    require_data()
    tasks = {"ner": {"kind": "ner", "labels": CONLL, "adapter": "ner", "layers": (1,), "rank": 4},
             "tc": {"kind": "tc", "labels": TREC, "adapter": None}}
    ckpt = make_checkpoint(tiny_bert, tmp_path / "ckpt", tasks=tasks)
    for name, dataset in (("ner", "conll2003"), ("tc", "trec")):
        _with_dataset(ckpt, name, dataset)
    out = tmp_path / "study"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--max-eval", "40",
                 "--recipe", "int8-all-emb8"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["recipes"]) == {"fp32", "int8-all-emb8"}
    assert res["tasks"]["tc"] == {"kind": "tc", "dataset": "trec", "dev": 0, "test": 40}
    for r in res["recipes"].values():
        assert r["scores"]["tc"]["dev"] is None  # TREC has no dev split
        assert set(r["latency_ms"]) == {"16", "64", "128"} and all(v > 0 for v in r["latency_ms"].values())
        for t in ("ner", "tc"):
            assert 0.0 <= r["scores"][t]["test"] <= 100.0
    assert res["recipes"]["int8-all-emb8"]["size"]["backbone_mb"] < res["recipes"]["fp32"]["size"]["backbone_mb"]
    # the fp32 TC score is the accuracy of Runtime.classify on the same seeded cut
    export_bundle(ckpt, tmp_path / "b", precision="fp32", ort_format=False, log=lambda *a: None)
    ds = load_task_data("trec", 40)
    got = Runtime(tmp_path / "b").classify([ex.text for ex in ds.test], task="tc")
    acc = 100.0 * float(np.mean([g.label == ex.label for g, ex in zip(got, ds.test)]))
    assert res["recipes"]["fp32"]["scores"]["tc"]["test"] == pytest.approx(acc)
    table = (out / "results.md").read_text()
    assert "| fp32 |" in table and "| int8-all-emb8 |" in table
    assert not (out / "bundles" / "fp32").exists()  # bundles are removed once scored


def test_unknown_dataset_is_skipped_with_a_note(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tiny_bert, tmp_path / "ckpt", tasks={"tc": {"kind": "tc", "labels": TREC,
                                                                       "adapter": None}})
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--recipe", "int8-all"]) == 2
    assert "no task with a loadable data set" in capsys.readouterr().err


def test_table_with_only_dev_less_tasks() -> None:
    """A suite whose only task has no dev split (TREC) still gets its table."""
    from mtpf_benchmarks.quality import markdown

    def rec(test: float) -> dict:
        return {"scores": {"trec": {"dev": None, "test": test}}, "latency_ms": {"16": 5.0, "64": 10.0, "128": 20.0},
                "size": {"backbone_mb": 34.0, "top_mb": 5.0}}

    res = {"checkpoint": "c", "max_eval": 300, "machine": "x", "seconds": 1.0,
           "tasks": {"trec": {"kind": "tc", "dataset": "trec", "dev": 0, "test": 300}},
           "recipes": {"fp32": rec(82.0), "int8-all": rec(81.0)}}
    row = next(line for line in markdown(res).splitlines() if line.startswith("| int8-all |"))
    assert row.endswith("| 81.00 (-1.00) |  | 1.00 | no |")
    assert row.startswith("| int8-all | 34.0 | 5.0 / 10.0 / 20.0 | 1.00 |")


def test_tasks_of_several_checkpoints_share_one_bundle(tiny_bert: Path, tmp_path: Path) -> None:
    """One-task checkpoints of one backbone (mtpf-compare's runs) are scored through one bundle, and each
    task scores there what it scores in a bundle of its own checkpoint alone. The first checkpoint's
    task has no adapter: the bundle is built with the LoRA slots the later ones need."""
    require_data()
    a = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "a", tasks={
        "ner": {"kind": "ner", "labels": CONLL, "adapter": "ner", "layers": (1,), "rank": 4}}), "ner", "conll2003")
    b = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "b", seed=1, tasks={
        "tc": {"kind": "tc", "labels": TREC, "adapter": None}}), "tc", "trec")
    out = tmp_path / "study"
    assert main(["--checkpoint", str(b), "--checkpoint", str(a), "--out", str(out), "--max-eval", "40",
                 "--recipe", "int8-all-emb8"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoints"] == [str(b), str(a)]
    assert "error" not in res["recipes"]["int8-all-emb8"]
    assert set(res["tasks"]) == {"ner", "tc"}
    ds = {"ner": load_task_data("conll2003", 40), "tc": load_task_data("trec", 40)}
    for name, ckpt in (("ner", a), ("tc", b)):
        alone = tmp_path / f"alone_{name}"
        export_bundle(ckpt, alone, precision="fp32", ort_format=False, log=lambda *a: None)
        want = (score_tc if name == "tc" else score_ner)(Runtime(alone), name, ds[name].test)
        assert res["recipes"]["fp32"]["scores"][name]["test"] == pytest.approx(want)
        assert 0.0 <= res["recipes"]["int8-all-emb8"]["scores"][name]["test"] <= 100.0


def test_several_checkpoints_are_refused_before_any_export(tiny_bert: Path, tiny_distilbert: Path,
                                                           tmp_path: Path, capsys) -> None:
    tc = {"tc": {"kind": "tc", "labels": TREC, "adapter": None}}
    a = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "a", tasks=tc), "tc", "trec")
    same_name = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "b", tasks=tc), "tc", "trec")
    other = _with_dataset(make_checkpoint(tiny_distilbert, tmp_path / "c", tasks={
        "tc2": {"kind": "tc", "labels": TREC, "adapter": None}}), "tc2", "trec")
    cases = [
        ([a, other], "other backbone weights"),
        ([a, same_name], "task 'tc' is in both"),
        ([a], "--task ['nope']: in none of the checkpoints"),
        ([a, tmp_path / "missing"], "not a checkpoint"),
    ]
    for i, (ckpts, message) in enumerate(cases):
        argv = [x for c in ckpts for x in ("--checkpoint", str(c))] + ["--out", str(tmp_path / f"o{i}"),
                                                                       "--recipe", "int8-all"]
        if "--task" in message:
            argv += ["--task", "nope"]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"o{i}").exists()  # refused before anything was written


def test_failed_fp32_reference_is_an_error_not_a_table(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    """With no fp32 bundle there is nothing to take gaps against: exit 1, say why, keep results.json."""
    require_data()
    ckpt = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "c", tasks={
        "tc": {"kind": "tc", "labels": TREC, "adapter": None}}), "tc", "trec")
    (ckpt / "backbone" / "tokenizer.json").write_text("{}")  # a broken tokenizer: no export can succeed
    out = tmp_path / "o"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--max-eval", "20", "--recipe", "int8-all"]) == 1
    assert "the fp32 reference could not be exported" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert "error" in res["recipes"]["fp32"] and "int8-all" not in res["recipes"]


def test_every_int8_recipe_names_its_embedding_table() -> None:
    """A recipe's name says its embeddings ("-emb8": INT8 rows, else fp32), its fp32 MatMul
    ranking and its adapters' type; none may fall back to export's default, which is INT8
    embeddings and float16 adapters and would turn a recipe into another one."""
    from mtpf_benchmarks.quality import RECIPES

    for name, kw in RECIPES.items():
        if name == "fp32":
            continue
        assert kw.get("embeddings") == ("int8" if name.endswith("-emb8") else "fp32"), name
        assert kw.get("scheme") == ("per-token" if "-tok-" in name else "static" if name.startswith("static")
                                    else "per-tensor" if name == "int8-tensor" else "per-channel"), name
        if "-auto" in name:
            assert kw["keep_fp32"] == "auto-any:" + name.split("-auto")[1].split("-")[0], name
        if "-trunk" in name:
            assert kw["keep_fp32"] == "auto:" + name.split("-trunk")[1].split("-")[0], name
        assert kw.get("adapter_dtype") == ("float16" if "-a16" in name else "float32"), name


def test_sample_file_ranks_the_matmuls_of_every_recipe(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    """--sample-file reaches the export: the MatMuls a recipe keeps are the ones mtpf-export
    keeps with the same texts. A bad file is refused before anything is written."""
    from mtpf_benchmarks.quality import RECIPES
    from mtpf_runtime.manifest import read_manifest

    require_data()
    ckpt = _with_dataset(make_checkpoint(tiny_bert, tmp_path / "c", tasks={"tc": {"kind": "tc", "labels": TREC,
                                                                                  "adapter": None}}), "tc", "trec")
    texts = ["@user lol ZZZZZZ 1234567890 #### !!!! ????", "http://t.co/xYz0 RT RT RT 999999999"] * 3
    (tmp_path / "s.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    out = tmp_path / "q"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--max-eval", "20", "--recipe", "int8-tok-auto6-emb8",
                 "--sample-file", str(tmp_path / "s.txt")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sample_file"] == {"path": str(tmp_path / "s.txt"), "texts": len(texts)}
    assert f"{len(texts)} from" in (out / "results.md").read_text()
    kept = {}
    for name, samples in (("with", texts), ("without", None)):
        export_bundle(ckpt, tmp_path / name, ort_format=False, log=lambda *a: None, sample_texts=samples,
                      **RECIPES["int8-tok-auto6-emb8"])
        kept[name] = read_manifest(tmp_path / name).quantization["fp32_matmuls_kept"]
    assert res["recipes"]["int8-tok-auto6-emb8"]["fp32_matmuls_kept"] == kept["with"]
    assert kept["with"] != kept["without"]  # the texts do change the ranking, so the check above means something
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    for bad, why in ((tmp_path / "none.txt", "cannot read"), (tmp_path / "empty.txt", "has no text")):
        if bad.name == "empty.txt":
            bad.write_text("\n \n", encoding="utf-8")
        assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--sample-file", str(bad)]) == 2
        assert why in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_fp32_embedding_recipe_ships_fp32_embeddings(tiny_bert: Path, tmp_path: Path) -> None:
    from mtpf_benchmarks.quality import RECIPES
    from mtpf_runtime.manifest import read_manifest

    ckpt = make_checkpoint(tiny_bert, tmp_path / "c", tasks={"tc": {"kind": "tc", "labels": TREC, "adapter": None}})
    sizes = {}
    for name in ("int8-all", "int8-all-emb8"):
        export_bundle(ckpt, tmp_path / name, ort_format=False, log=lambda *a: None, **RECIPES[name])
        sizes[name] = (tmp_path / name / "backbone.onnx").stat().st_size
        assert read_manifest(tmp_path / name).quantization.get("embeddings") == RECIPES[name]["embeddings"]
    assert sizes["int8-all-emb8"] < sizes["int8-all"]
