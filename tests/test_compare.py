"""The comparison table (mtpf-compare) and the cached-lower-layers path of task adaptation.

Tiny random encoders and toy datasets built here; the whole file runs in well under a
minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from mtpf_training import adapt, arch, compare  # noqa: E402
from mtpf_training import checkpoint as ck  # noqa: E402
from mtpf_training.compare import Settings  # noqa: E402
from mtpf_training.data import Dataset, NerExample, TcExample, available_datasets  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: threads only slow things down
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- toy data

def toy_ner(name: str = "toy_ner", n_train: int = 30, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    filler = ("the", "a", "went", "to", "house", "saw", "dog", "ran", "home", "big")

    def sent() -> NerExample:
        tokens = [rng.choice(filler) for _ in range(rng.randint(2, 7))]
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(("alice", "bob")))
        return NerExample(tuple(tokens), tuple("B-PER" if t in ("alice", "bob") else "O" for t in tokens))

    return Dataset(name, "ner", tuple(sent() for _ in range(n_train)), (), tuple(sent() for _ in range(8)),
                   ("PER",), "toy")


def toy_tc(name: str = "toy_tc") -> Dataset:
    words = {"negative": ("awful", "bad", "terrible"), "positive": ("great", "good", "excellent")}
    rng = random.Random(1)

    def split(n: int) -> tuple[TcExample, ...]:
        return tuple(TcExample(" ".join(rng.choice(words[c]) for _ in range(3)), c)
                     for i in range(n) for c in [("negative", "positive")[i % 2]])

    return Dataset(name, "tc", split(20), split(6), split(8), ("negative", "positive"), "toy")


TOYS = {"toy_ner": toy_ner, "toy_tc": toy_tc}


def _loader(name: str) -> Dataset:
    return TOYS[name]()


def _lora(backbone: Path, layers: tuple[int, ...], seed: int, dropout: float = 0.0) -> Any:
    """A PEFT LoRA with random (non-zero) B on ``layers``: a no-op adapter would test nothing."""
    model = AutoModel.from_pretrained(backbone)
    a = arch.arch_for(model.config.model_type)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                          target_modules=arch.peft_target_regex(a, layers, arch.DEFAULT_TARGETS)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return pm


@pytest.fixture()
def tpl_ckpt(tiny_bert: Path, tmp_path: Path) -> Path:
    """A fake MTPF-TPL checkpoint: the tiny backbone plus PEFT adapters pf_ner and pf_tc."""
    ckpt = ck.init_checkpoint(tmp_path / "tpl", tiny_bert)
    ck.install_adapter(ckpt, "pf_ner", _lora(ckpt / "backbone", (1,), seed=1))
    ck.install_adapter(ckpt, "pf_tc", _lora(ckpt / "backbone", (1,), seed=2))
    return ckpt


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): ck.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the table from fake results

def _run(mode: str, dataset: str, kind: str, seed: int, value: float, settings: Settings) -> dict[str, Any]:
    s = settings.for_kind(kind)
    return {"key": compare.run_key(mode, dataset, seed, s), "mode": mode, "dataset": dataset, "seed": seed,
            "settings": s, "kind": kind, "metric": "f1" if kind == "ner" else "accuracy", "value": value,
            "seconds": 1.0, "train_examples": 10, "test_examples": 5}


def test_table_cells_averages_deltas_and_std_from_fake_results() -> None:
    st = Settings(max_train=10)
    vals = {  # (mode, dataset): (seed 0, seed 1)
        ("base", "conll2003"): (0.50, 0.70), ("base", "wnut17"): (0.30, 0.30),
        ("tpl", "conll2003"): (0.60, 0.80), ("tpl", "wnut17"): (0.20, 0.40),
        ("base", "sst2"): (0.80, 0.80), ("tpl", "sst2"): (0.90, 0.92),
    }
    kinds = {"conll2003": "ner", "wnut17": "ner", "sst2": "tc"}
    runs = [_run(m, d, kinds[d], s, v[s], st) for (m, d), v in vals.items() for s in (0, 1)]
    runs.append(_run("tpl", "sst2", "tc", 0, 0.0, Settings(max_train=99)))  # other settings: ignored
    datasets = ["conll2003", "wnut17", "sst2"]
    s = compare.summarise(runs, ["base", "tpl"], datasets, [0, 1], st)
    assert s["families"] == {"ner": ["conll2003", "wnut17"], "tc": ["sst2"]}
    assert s["mean"][("tpl", "sst2")] == pytest.approx(91.0)
    # family average = mean of dataset means: base NER (60 + 30) / 2, tpl NER (70 + 30) / 2
    assert s["average"][("base", "ner")]["mean"] == pytest.approx(45.0)
    assert s["average"][("tpl", "ner")]["mean"] == pytest.approx(50.0)
    # ± = std over seeds of the per-seed averages: base (40, 50) -> 7.07, tpl (40, 60) -> 14.14
    assert s["average"][("base", "ner")]["std"] == pytest.approx(np.std([40, 50], ddof=1))
    assert s["delta"][("tpl", "conll2003")] == pytest.approx(10.0)
    assert s["delta"][("tpl", "wnut17")] == pytest.approx(0.0)
    assert s["family_delta"][("tpl", "ner")] == pytest.approx(5.0)
    assert s["family_delta"][("tpl", "tc")] == pytest.approx(11.0)

    table = compare.render_table(runs, ["base", "tpl"], datasets, [0, 1], st)
    assert "| conll2003 | 10/5 | 60.0 ± 14.1 | 70.0 ± 14.1 |" in table
    assert "| wnut17 | 10/5 | 30.0 ± 0.0 | 30.0 ± 14.1 |" in table
    assert "| sst2 | 10/5 | 80.0 ± 0.0 | 91.0 ± 1.4 |" in table
    assert "| **average** | | **45.0 ± 7.1** | **50.0 ± 14.1** |" in table
    # Δ ± = std over seeds of the paired differences: conll2003 (10, 10), wnut17 (-10, +10), NER
    # per seed (0, 10), sst2 (10, 12); not the std of either mode's scores
    assert s["delta_std"][("tpl", "conll2003")] == pytest.approx(0.0)
    assert s["delta_std"][("tpl", "wnut17")] == pytest.approx(np.std([-10, 10], ddof=1))
    assert s["family_delta_std"][("tpl", "ner")] == pytest.approx(np.std([0, 10], ddof=1))
    assert "| conll2003 | +10.0 ± 0.0 |" in table and "| wnut17 | +0.0 ± 14.1 |" in table
    assert "| **ner average** | **+5.0 ± 7.1** |" in table
    assert "| sst2 | +11.0 ± 1.4 |" in table and "| **tc average** | **+11.0 ± 1.4** |" in table


def test_table_with_one_seed_and_a_missing_cell() -> None:
    st = Settings()
    runs = [_run("base", "conll2003", "ner", 0, 0.5, st), _run("base", "wnut17", "ner", 0, 0.3, st),
            _run("ner", "conll2003", "ner", 0, 0.6, st)]
    table = compare.render_table(runs, ["base", "ner"], ["conll2003", "wnut17"], [0], st)
    assert "| conll2003 | 10/5 | 50.0 | 60.0 |" in table  # no ± with one seed
    assert "| wnut17 | 10/5 | 30.0 | – |" in table
    assert "| **average** | | **40.0** | **60.0 (1/2)** |" in table  # incomplete average says so
    assert "| **ner average** | **+10.0** |" in table  # delta over the datasets both modes have


# --------------------------------------------------------------------------- datasets and suites

def test_default_suite_has_21_plus_registered_datasets() -> None:
    kinds = available_datasets()
    suite = compare.resolve_suite("default")
    assert all(n in kinds for n in suite)
    assert sum(kinds[n] == "ner" for n in suite) >= 10 and sum(kinds[n] == "tc" for n in suite) >= 11
    assert compare.resolve_suite("sst2, trec") == ["sst2", "trec"]
    with pytest.raises(ValueError, match="unknown dataset"):
        compare.resolve_suite("sst2,nope")


def test_low_resource_takes_ten_percent_deterministically() -> None:
    ds = toy_ner(n_train=50)
    a = compare.prepare_dataset(ds, Settings(low_resource=True))
    b = compare.prepare_dataset(ds, Settings(low_resource=True))
    assert len(a.train) == 5 and a.train == b.train and a.dev == ()
    assert all(ex in ds.train for ex in a.train)
    # before --max-train: 10% of 50 = 5, then capped to 3 of those 5
    c = compare.prepare_dataset(ds, Settings(low_resource=True, max_train=3))
    assert len(c.train) == 3 and set(c.train) <= set(a.train)
    assert compare.prepare_dataset(toy_tc(), Settings(low_resource=True)).train == toy_tc().train
    capped = compare.prepare_dataset(toy_tc(), Settings(max_test=4))
    assert len(capped.test) == 4 and len(capped.dev) == 4


def test_per_seed_training_subsets() -> None:
    ds = toy_tc()
    fixed = Settings(max_train=8, max_test=4)
    per = Settings(max_train=8, max_test=4, train_subsets="per-seed")
    f0, f1 = compare.prepare_dataset(ds, fixed, 0), compare.prepare_dataset(ds, fixed, 1)
    p0, p1 = compare.prepare_dataset(ds, per, 0), compare.prepare_dataset(ds, per, 1)
    assert f0 == f1 and p0 == f0  # seed 0 draws the same subset either way
    assert p1.train != p0.train and len(p1.train) == 8 and set(p1.train) <= set(ds.train)
    assert p1.test == p0.test and p1.dev == p0.dev  # scored on the same examples
    lr = Settings(low_resource=True, train_subsets="per-seed")
    big = toy_ner(n_train=50)
    assert compare.prepare_dataset(big, lr, 1).train != compare.prepare_dataset(big, lr, 0).train
    # the default leaves run keys as they were before the setting existed: old results still resume
    assert "train_subsets" not in fixed.for_kind("tc") and per.for_kind("tc")["train_subsets"] == "per-seed"
    with pytest.raises(compare.CompareError, match="per-seed"):
        Settings(train_subsets="sometimes")


def test_ner_lora_layers_in_ner_keys_only_when_not_the_default() -> None:
    # "2" was the only placement before the setting existed: those runs keep their keys
    assert "ner_lora_layers" not in Settings().for_kind("ner")
    assert Settings(ner_lora_layers="4").for_kind("ner")["ner_lora_layers"] == "4"
    assert "ner_lora_layers" not in Settings(ner_lora_layers="4").for_kind("tc")
    for ok in ("1", "all", "0,3,5"):
        Settings(ner_lora_layers=ok)
    for bad in ("0", "-1", "top", "", "1,x"):
        with pytest.raises(compare.CompareError, match="ner_lora_layers"):
            Settings(ner_lora_layers=bad)


def test_min_steps_in_ner_keys_only_when_set() -> None:
    # 0 was the protocol before the setting existed: those runs keep their keys and resume.
    assert "min_steps" not in Settings(min_steps=0).for_kind("ner")
    assert Settings(min_steps=300).for_kind("ner")["min_steps"] == 300
    assert "min_steps" not in Settings(min_steps=300).for_kind("tc")  # the probe has no steps
    k0 = compare.run_key("base", "conll2003", 0, Settings(min_steps=0).for_kind("ner"))
    k1 = compare.run_key("base", "conll2003", 0, Settings(min_steps=300).for_kind("ner"))
    assert k0 != k1
    with pytest.raises(compare.CompareError, match="min-steps"):
        compare._settings(compare.build_parser().parse_args(["--out", "x", "--min-steps", "-1"]))


# --------------------------------------------------------------------------- end to end on the tiny model

def test_compare_end_to_end_resumes_and_uses_tpl_adapters(
        tiny_bert: Path, tpl_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    st = Settings(epochs=1, min_steps=0)
    before = _tree(tpl_ckpt)
    lines: list[str] = []
    data = compare.compare({"base": str(tiny_bert), "tpl": str(tpl_ckpt)}, ["toy_ner", "toy_tc"], out,
                           seeds=[0, 1], settings=st, loader=_loader, echo=lines.append)
    assert len(data["runs"]) == 8 and len(lines) == 8
    assert _tree(tpl_ckpt) == before  # the pre-finetuned checkpoint is never written to
    runs = {(r["mode"], r["dataset"], r["seed"]): r for r in data["runs"]}
    assert runs[("tpl", "toy_ner", 0)]["init_adapter"] == "pf_ner"
    assert runs[("base", "toy_ner", 0)]["init_adapter"] is None
    assert runs[("tpl", "toy_ner", 0)]["config"]["init_adapter"] == str(tpl_ckpt / "adapters" / "pf_ner")
    assert runs[("tpl", "toy_ner", 0)]["config"]["lora_layers"] == [1]  # the adapter's own placement
    assert runs[("tpl", "toy_tc", 1)]["adapter"] == "pf_tc" and runs[("base", "toy_tc", 1)]["adapter"] is None
    child = Path(runs[("tpl", "toy_tc", 1)]["task_checkpoint"])
    assert json.loads((child / "tasks" / "toy_tc.json").read_text())["adapter"] == "pf_tc"
    assert ck.sha256_file(child / "adapters/pf_tc/adapter_model.safetensors") == \
        ck.sha256_file(tpl_ckpt / "adapters/pf_tc/adapter_model.safetensors")
    # the TC probe saw other embeddings with the adapter active
    assert not np.allclose(
        adapt.pooled_embeddings(*_model_tok(tpl_ckpt, "pf_tc"), ["good great"]),
        adapt.pooled_embeddings(*_model_tok(tpl_ckpt, None), ["good great"]))

    table = (out / "table.md").read_text()
    for d in ("toy_ner", "toy_tc"):
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {d} |"))
        assert row.count("±") == 2  # a cell per mode, mean ± std over two seeds
    assert "Δ vs base" in table

    # resumption: nothing runs again, a new seed runs only its own runs
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(adapt, "train_ner", boom)
    monkeypatch.setattr(adapt, "train_tc", boom)
    lines.clear()
    again = compare.compare({"base": str(tiny_bert), "tpl": str(tpl_ckpt)}, ["toy_ner", "toy_tc"], out,
                            seeds=[0, 1], settings=st, loader=_loader, echo=lines.append)
    assert len(again["runs"]) == 8 and all("skipped" in ln for ln in lines)
    monkeypatch.undo()
    third = compare.compare({"base": str(tiny_bert)}, ["toy_tc"], out, seeds=[0, 1, 2], settings=st,
                            loader=_loader, echo=lines.append)
    assert len(third["runs"]) == 9
    # another setting in the same --out trains into its own folders: no task checkpoint is overwritten
    before = {r["task_checkpoint"] for r in third["runs"]}
    fourth = compare.compare({"base": str(tiny_bert)}, ["toy_tc"], out, seeds=[1],
                             settings=replace(st, max_train=6, train_subsets="per-seed"), loader=_loader,
                             echo=lines.append)
    new = [r for r in fourth["runs"] if r["settings"].get("train_subsets") == "per-seed"]
    assert len(new) == 1 and new[0]["task_checkpoint"] not in before
    assert all(Path(p).is_dir() for p in before | {new[0]["task_checkpoint"]})
    # the NER step budget reaches train_ner (30 sentences at batch 8: 4 steps an epoch) and is
    # part of the key: the run does not resume the fixed-epoch one
    fifth = compare.compare({"base": str(tiny_bert)}, ["toy_ner"], out, seeds=[0],
                            settings=replace(st, min_steps=10, ner_batch_size=8), loader=_loader,
                            echo=lines.append)
    budget = [r for r in fifth["runs"] if r["settings"].get("min_steps") == 10]
    assert len(budget) == 1 and "skipped" not in lines[-1]
    assert (budget[0]["config"]["epochs_run"], budget[0]["config"]["steps"]) == (3, 12)
    # a fresh NER LoRA on the top layer only (the default 2 covers both of the tiny model's)
    sixth = compare.compare({"base": str(tiny_bert)}, ["toy_ner"], out, seeds=[0],
                            settings=replace(st, ner_lora_layers="1"), loader=_loader, echo=lines.append)
    top = [r for r in sixth["runs"] if r["settings"].get("ner_lora_layers") == "1"]
    assert [r["config"]["lora_layers"] for r in top] == [[1]] and "skipped" not in lines[-1]
    assert runs[("base", "toy_ner", 0)]["config"]["lora_layers"] == [0, 1]


def test_results_of_another_checkpoint_are_not_mixed(tiny_bert: Path, tpl_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    compare.compare({"tpl": str(tpl_ckpt)}, ["toy_tc"], out, loader=_loader, echo=lambda m: None)
    with pytest.raises(ValueError, match="another --out"):
        compare.compare({"tpl": str(tiny_bert)}, ["toy_tc"], out, loader=_loader, echo=lambda m: None)


@pytest.mark.skipif(sys.platform == "win32", reason="the --out lock is POSIX flock")
def test_a_second_process_on_the_same_out_is_refused(tpl_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    compare.compare({"tpl": str(tpl_ckpt)}, ["toy_tc"], out, loader=_loader, echo=lambda m: None)
    saved = (out / "results.json").read_bytes()
    # another process holds OUT the way a running mtpf-compare does, until its stdin closes
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from mtpf_training import compare; "
         "cm = compare._exclusive(Path(sys.argv[1])); cm.__enter__(); print('held', flush=True); "
         "sys.stdin.read(); cm.__exit__(None, None, None)", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(compare.CompareError, match=rf"in use by another mtpf-compare \(pid {holder.pid}\)"):
            compare.compare({"tpl": str(tpl_ckpt)}, ["toy_tc"], out, seeds=[0, 1], loader=_loader,
                            echo=lambda m: None)
        assert (out / "results.json").read_bytes() == saved  # nothing ran, nothing written
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    data = compare.compare({"tpl": str(tpl_ckpt)}, ["toy_tc"], out, seeds=[0, 1], loader=_loader,
                           echo=lambda m: None)  # free again once the holder is gone
    assert len(data["runs"]) == 2


def test_datasets_seen_in_pre_finetuning_are_refused(tpl_ckpt: Path, tmp_path: Path) -> None:
    cfg_path = tpl_ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pretrain"] = {"config": {"mode": "tpl", "label_pair_sources": ["toy_tc", "imdb"]}}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(compare.CompareError, match=r"labels of \['toy_tc'\].*not be held out"):
        compare.compare({"tpl": str(tpl_ckpt)}, ["toy_ner", "toy_tc"], tmp_path / "out", loader=_loader,
                        echo=lambda m: None)
    assert not list((tmp_path / "out").glob("runs/*"))  # refused before any run
    data = compare.compare({"tpl": str(tpl_ckpt)}, ["toy_ner"], tmp_path / "out", loader=_loader,
                           settings=Settings(epochs=1, min_steps=0), echo=lambda m: None)
    assert [r["dataset"] for r in data["runs"]] == ["toy_ner"]


def test_cli_parses_modes_and_rejects_bad_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(compare.parse_checkpoints(["tpl=a", "base=minilm", "x=b"])) == ["base", "tpl", "x"]
    with pytest.raises(SystemExit) as e:
        compare.main(["--checkpoint", "base", "--out", str(tmp_path), "--suite", "sst2"])
    assert e.value.code == 2 and "MODE=DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- cached lower layers

def _model_tok(ckpt: Path, adapter: str | None) -> tuple[Any, Any]:
    base, tok, a = ck.load_backbone(ckpt)
    model = ck.load_adapter(base, ckpt / "adapters" / adapter, a, trainable=False) if adapter else base
    return model, tok


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_distilbert"])
def test_cached_lower_layers_match_the_full_forward(fixture: str, request: pytest.FixtureRequest) -> None:
    backbone: Path = request.getfixturevalue(fixture)
    model = _lora(backbone, (1,), seed=3, dropout=0.0)  # LoRA on the top layer only
    model.eval()  # dropout off everywhere: both paths must then agree
    a = arch.arch_for(model.config.model_type)
    assert adapt.first_trainable_layer(model, a) == 1
    tok = AutoTokenizer.from_pretrained(backbone)
    rows = tok(["alice went home", "the big dog ran to the house with bob and alice", "a"])["input_ids"]
    lower = adapt.lower_hidden_states(model, a, rows, 1, tok.pad_token_id)
    assert [t.shape[0] for t in lower] == [len(r) for r in rows]
    cached = adapt.upper_forward(model, a, lower, 1)  # (3, T, H), zero-padded
    ids = adapt._pad(rows, tok.pad_token_id)
    mask = adapt._pad([[1] * len(r) for r in rows], 0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for j, r in enumerate(rows):  # real positions only: padded ones are masked and never scored
        assert torch.allclose(cached[j, :len(r)], full[j, :len(r)], atol=1e-5), (j, fixture)
    # gradients reach the LoRA through the cached path
    cached.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_ner_cache_is_computed_once_across_seeds(tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = adapt.lower_hidden_states
    monkeypatch.setattr(adapt, "lower_hidden_states",
                        lambda m, a, rows, *x, **k: calls.append(len(rows)) or real(m, a, rows, *x, **k))
    cache = adapt.FeatureCache()
    ds = toy_ner()
    metrics = []
    for seed in (0, 1):
        ckpt = ck.init_checkpoint(tmp_path / f"c{seed}", tiny_bert)
        metrics.append(adapt.train_ner(ckpt, ds, "toy", epochs=1, min_steps=0, seed=seed, progress=False,
                                       feature_cache=cache))
        assert ck.read_config(ckpt)["tasks"]["toy"]["cached_lower_layers_below"] == 0  # LoRA on both layers
    assert calls[0] == len({tuple(ex.tokens) for ex in ds.train}) and sum(calls[1:]) == 0
    ckpt = ck.init_checkpoint(tmp_path / "full", tiny_bert)
    adapt.train_ner(ckpt, ds, "toy", epochs=1, min_steps=0, progress=False, cache_lower_layers=False)
    assert ck.read_config(ckpt)["tasks"]["toy"]["cached_lower_layers_below"] is None


def test_tc_probe_embeds_each_text_once(tiny_bert: Path, tpl_ckpt: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    embedded: list[str] = []
    real = adapt.pooled_embeddings
    monkeypatch.setattr(adapt, "pooled_embeddings",
                        lambda m, t, texts, *a, **k: embedded.extend(texts) or real(m, t, texts, *a, **k))
    ds = toy_tc()
    unique = {ex.text for ex in ds.train + ds.dev + ds.test}
    adapt.train_tc(ck.init_checkpoint(tmp_path / "one", tiny_bert), ds, "toy", progress=False)
    assert sorted(embedded) == sorted(unique)  # within a run: once per text, dev reused for the metric
    embedded.clear()
    cache = adapt.FeatureCache()
    accs = [adapt.train_tc(ck.init_checkpoint(tmp_path / f"s{seed}", tiny_bert), ds, "toy", seed=seed,
                           max_train=10, progress=False, feature_cache=cache)["test"]["accuracy"]
            for seed in (0, 1)]
    # seeds draw other 10-example subsets: each text is still embedded at most once
    assert len(embedded) == len(set(embedded)) and set(embedded) <= unique
    # a different adapter is a different table: embedded again
    adapt.train_tc(tpl_ckpt, ds, "toy", adapter="pf_tc", progress=False, feature_cache=cache)
    assert len(embedded) > len(set(embedded)) and all(0 <= a <= 1 for a in accs)


def test_cli_table_only_rewrites_the_table_from_results(tmp_path: Path) -> None:
    st = Settings(max_train=10, epochs=2, min_steps=0)
    runs = [_run("base", "conll2003", "ner", 0, 0.5, st), _run("tpl", "conll2003", "ner", 0, 0.55, st),
            _run("base", "sst2", "tc", 0, 0.8, st), _run("tpl", "sst2", "tc", 0, 0.85, st)]
    (tmp_path / "results.json").write_text(json.dumps(
        {"schema": compare.SCHEMA, "checkpoints": {"tpl": {}, "base": {}}, "runs": runs}))
    assert compare.main(["--table-only", "--suite", "conll2003,sst2", "--out", str(tmp_path),
                         "--max-train", "10", "--epochs", "2", "--min-steps", "0"]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "| dataset | train/test | base | tpl |" in table  # base first whatever the stored order
    assert "| conll2003 | 10/5 | 50.0 | 55.0 |" in table and "| sst2 | +5.0 |" in table
