"""training/plots.py: the study's plots read mtpf-compare results correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mtpf_training.plots import load_means, main, plot_deltas, plot_scale  # noqa: E402

NER_SET = {"epochs": 3, "low_resource": False}
TC_SET = {"max_train": 500}


def _results(tmp_path: Path) -> Path:
    runs = []
    for mode, add in (("base", 0.0), ("tpl", 0.05), ("s1", 0.02)):
        for seed, jitter in ((0, 0.0), (1, 0.02)):
            runs.append({"mode": mode, "dataset": "conll2003", "seed": seed, "kind": "ner", "settings": NER_SET,
                         "value": 0.30 + add + jitter})
            runs.append({"mode": mode, "dataset": "sst2", "seed": seed, "kind": "tc", "settings": TC_SET,
                         "value": 0.80 + add})
    # a run with other settings (e.g. a low-resource pass in the same file) is left out
    runs.append({"mode": "base", "dataset": "conll2003", "seed": 0, "kind": "ner",
                 "settings": {**NER_SET, "low_resource": True}, "value": 0.0})
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_means_per_mode_and_dataset(tmp_path: Path) -> None:
    mean, kind = load_means(_results(tmp_path))
    assert mean[("base", "conll2003")] == pytest.approx(31.0)  # (30 + 32) / 2, the low-resource run ignored
    assert mean[("tpl", "sst2")] == pytest.approx(85.0)
    assert kind == {"conll2003": "ner", "sst2": "tc"}


def test_plots_are_written(tmp_path: Path) -> None:
    res = _results(tmp_path)
    assert main(["deltas", str(res), "--out", str(tmp_path / "d.png"), "--modes", "tpl,s1"]) == 0
    assert main(["scale", str(res), "--out", str(tmp_path / "s.png"), "--points", "s1=1333,tpl=4000"]) == 0
    for png in ("d.png", "s.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["deltas", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png")]) == 2


def test_deltas_draw_only_the_families_with_base_runs(tmp_path: Path) -> None:
    res = _results(tmp_path)
    assert plot_deltas(res, tmp_path / "both.png", ["tpl"]) == ["ner", "tc"]
    data = json.loads(res.read_text())
    ner_only = tmp_path / "ner_only.json"  # an NER-only table (e.g. a low-resource pass)
    ner_only.write_text(json.dumps({"runs": [r for r in data["runs"] if r["kind"] == "ner"]}))
    assert plot_deltas(ner_only, tmp_path / "ner.png", ["tpl"]) == ["ner"]
    no_base = tmp_path / "no_base.json"
    no_base.write_text(json.dumps({"runs": [r for r in data["runs"] if r["mode"] != "base"]}))
    with pytest.raises(ValueError, match="no base runs"):
        plot_deltas(no_base, tmp_path / "x.png", ["tpl"])


def test_scale_seeds_filter_and_families(tmp_path: Path) -> None:
    res = _results(tmp_path)
    mean, _ = load_means(res, seeds=[0])
    assert mean[("base", "conll2003")] == pytest.approx(30.0)  # seed 1's 32 left out
    assert plot_scale(res, tmp_path / "s.png", {"s1": 1333, "tpl": 4000}, seeds=[1]) == ["ner", "tc"]
    data = json.loads(res.read_text())
    ner_only = tmp_path / "ner_only.json"
    ner_only.write_text(json.dumps({"runs": [r for r in data["runs"] if r["kind"] == "ner"]}))
    assert plot_scale(ner_only, tmp_path / "n.png", {"s1": 1333, "tpl": 4000}) == ["ner"]
    with pytest.raises(ValueError, match="no task family"):
        plot_scale(res, tmp_path / "x.png", {"s1": 1333, "missing": 4000})
    with pytest.raises(SystemExit):
        main(["scale", str(res), "--out", str(tmp_path / "y.png"), "--points", "s1=1", "--seeds", "a"])


def test_several_tables_read_as_one_and_a_run_in_two_is_an_error(tmp_path: Path) -> None:
    data = json.loads(_results(tmp_path).read_text())
    ner, tc = tmp_path / "ner.json", tmp_path / "tc.json"  # e.g. an NER table and a per-seed TC table
    ner.write_text(json.dumps({"runs": [r for r in data["runs"] if r["kind"] == "ner"]}))
    tc.write_text(json.dumps({"runs": [r for r in data["runs"] if r["kind"] == "tc"]}))
    assert load_means([ner, tc]) == load_means(tmp_path / "results.json")
    assert plot_deltas([ner, tc], tmp_path / "d.png", ["tpl"]) == ["ner", "tc"]
    assert main(["deltas", str(ner), str(tc), "--out", str(tmp_path / "m.png"), "--modes", "tpl"]) == 0
    with pytest.raises(ValueError, match="conll2003 seed 0 is also in"):
        load_means([ner, tmp_path / "results.json"])
    assert main(["deltas", str(ner), str(ner), "--out", str(tmp_path / "x.png")]) == 2


def test_one_mode_name_for_two_checkpoints_across_tables_is_an_error(tmp_path: Path) -> None:
    data = json.loads(_results(tmp_path).read_text())
    ner, tc = tmp_path / "ner.json", tmp_path / "tc.json"
    ner.write_text(json.dumps({"checkpoints": {"tpl": {"path": "/a/tpl", "fingerprint": "aaaa"}},
                               "runs": [r for r in data["runs"] if r["kind"] == "ner"]}))
    same = {"checkpoints": {"tpl": {"path": "/b/tpl", "fingerprint": "aaaa"}},  # moved, same content
            "runs": [r for r in data["runs"] if r["kind"] == "tc"]}
    tc.write_text(json.dumps(same))
    assert load_means([ner, tc]) == load_means(tmp_path / "results.json")
    tc.write_text(json.dumps({**same, "checkpoints": {"tpl": {"path": "/b/tpl", "fingerprint": "bbbb"}}}))
    with pytest.raises(ValueError, match="mode 'tpl' is checkpoint /b/tpl"):
        load_means([ner, tc])
