"""Task adaptation: checkpoint format, learning, probe heads, determinism, CLI.

Everything runs on the tiny random encoders from conftest with toy data built here,
so the whole file takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from mtpf_training import adapt, arch  # noqa: E402
from mtpf_training import checkpoint as ck  # noqa: E402
from mtpf_training.data import Dataset, NerExample, TcExample  # noqa: E402

NAMES = ("alice", "bob")
PLACES = ("paris", "rome")
FILLER = ("the", "a", "went", "to", "house", "saw", "and", "dog", "ran", "home", "with", "big")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core box spinning
    # intra-op threads slow everything down many times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- toy data

def _sentence(rng: random.Random, with_place: bool) -> NerExample:
    tokens = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
    tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(NAMES))
    if with_place:
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(PLACES))
    tags = ["B-PER" if t in NAMES else "B-LOC" if t in PLACES else "O" for t in tokens]
    return NerExample(tuple(tokens), tuple(tags))


def toy_ner(n_train: int = 40, n_test: int = 16, seed: int = 0, places: bool = True,
            long_test: bool = False) -> Dataset:
    rng = random.Random(seed)
    train = tuple(_sentence(rng, places and i % 2 == 0) for i in range(n_train))
    test = tuple(_sentence(rng, places and i % 2 == 0) for i in range(n_test))
    if long_test:  # 200 one-piece words: beyond a 128-position model's reach
        test += (NerExample(("the",) * 200, ("O",) * 200),)
    types = ("LOC", "PER") if places else ("PER",)
    return Dataset("toy_ner", "ner", train, (), test, types, "built in the test")


def toy_tc(seed: int = 0, classes: tuple[str, ...] = ("negative", "positive")) -> Dataset:
    words = {"negative": ("awful", "terrible", "horrible", "bad"),
             "positive": ("great", "wonderful", "excellent", "good"),
             "neutral": ("table", "window", "number", "paper")}
    rng = random.Random(seed)

    def split(n: int) -> tuple[TcExample, ...]:
        # Each text is made of its class's words only: separable for any encoder.
        return tuple(TcExample(" ".join(rng.choice(words[c]) for _ in range(4)), c)
                     for i in range(n) for c in [classes[i % len(classes)]])

    return Dataset("toy_tc", "tc", split(30), split(12), split(12), classes, "built in the test")


def new_ckpt(tmp_path: Path, base: Path, sub: str = "ckpt") -> Path:
    return ck.init_checkpoint(tmp_path / sub, base)


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def head_from_arrays(w: np.ndarray, b: np.ndarray) -> torch.nn.Linear:
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        head.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
    return head


def reload_head(ckpt: Path, task: str) -> torch.nn.Linear:
    t = ck.load_task(ckpt, task)
    return head_from_arrays(t.head_weight, t.head_bias)


FAST = {"epochs": 1, "batch_size": 8, "progress": False}


# --------------------------------------------------------------------------- NER format + parity

@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_distilbert"])
def test_ner_checkpoint_format_and_reload_parity(fixture: str, request: pytest.FixtureRequest,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base: Path = request.getfixturevalue(fixture)
    ckpt = new_ckpt(tmp_path, base)
    ds = toy_ner(long_test=True)
    probe_words = [ex.tokens for ex in ds.test[:6]]
    captured: dict[str, Any] = {}
    real_save = ck.save_task

    def spy(ckpt_: Path, name: str, kind: str, labels: Any, w: Any, b: Any, adapter_name: Any,
            model: Any, *rest: Any) -> Path:
        # The logits of the in-memory model, just before it is written.
        head = head_from_arrays(w, b)
        captured["logits"] = adapt.ner_logits(model, head, AutoTokenizer.from_pretrained(ckpt_ / "backbone"),
                                              probe_words)
        return real_save(ckpt_, name, kind, labels, w, b, adapter_name, model, *rest)

    monkeypatch.setattr(ck, "save_task", spy)
    metrics = adapt.train_ner(ckpt, ds, "toy", **FAST)

    # Files, per the format.
    for rel in ("backbone/config.json", "backbone/model.safetensors", "backbone/tokenizer.json",
                "adapters/toy/adapter_config.json", "adapters/toy/adapter_model.safetensors",
                "heads/toy.safetensors", "tasks/toy.json", "config.json", "metrics.json"):
        assert (ckpt / rel).is_file(), rel
    assert not [p for p in ckpt.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]

    # Exactly the default slots: last 2 layers x (query, key, ffn_in, ffn_out) x {A, B}.
    model_type = json.loads((ckpt / "backbone/config.json").read_text())["model_type"]
    a = arch.arch_for(model_type)
    keys = lora_tensors(ckpt / "adapters/toy").keys()
    parsed = {arch.parse_lora_key(a, k) for k in keys}
    assert parsed == {(layer, t, w) for layer in (0, 1) for t in arch.DEFAULT_TARGETS for w in "AB"}
    assert len(keys) == 16

    task = json.loads((ckpt / "tasks/toy.json").read_text())
    assert task["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert task["entity_types"] == ["LOC", "PER"]
    assert (task["kind"], task["adapter"], task["pooling"]) == ("ner", "toy", "first_subtoken")
    assert task["max_length"] == 128 and task["dataset"] == "toy_ner"
    head = load_file(str(ckpt / "heads/toy.safetensors"))
    assert head["weight"].dtype == np.float32 and head["weight"].shape == (5, 32)
    assert head["bias"].shape == (5,)

    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["schema"] == "mtpf-checkpoint/1" and cfg["base"] == str(base)
    assert cfg["backbone_sha256"] == ck.sha256_file(ckpt / "backbone/model.safetensors")
    assert cfg["tasks"]["toy"]["lora_layers"] == [0, 1] and cfg["tasks"]["toy"]["seed"] == 0
    assert json.loads((ckpt / "metrics.json").read_text())["toy"] == metrics == task["metrics"]
    assert ck.list_tasks(ckpt) == ["toy"]

    # Words past the 128 positions of the tiny model: counted, predicted "O", never dropped.
    assert metrics["test"]["words_truncated"] == 200 - 126
    assert metrics["test"]["words"] == sum(len(ex.tokens) for ex in ds.test)

    # Reloading backbone + adapter + head from disk reproduces the in-memory logits.
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(ckpt / "backbone"), ckpt / "adapters/toy")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "backbone")
    again = adapt.ner_logits(model, reload_head(ckpt, "toy"), tokenizer, probe_words)
    for before, after in zip(captured["logits"], again):
        assert before.shape == (len(after), 5)
        np.testing.assert_allclose(after, before, atol=1e-5)


def test_ner_learns_a_trivial_task(tiny_bert: Path, tmp_path: Path) -> None:
    # "alice"/"bob" are always B-PER. On the random tiny BERT the signal must pass two
    # frozen random layers, so it takes ~150 steps: 30 epochs x 5 batches at lr 3e-3
    # reach F1 1.0 for data seeds 0-2 (lr >= 2e-2 collapses to all-"O"; 1 epoch stays at 0).
    ckpt = new_ckpt(tmp_path, tiny_bert)
    metrics = adapt.train_ner(ckpt, toy_ner(places=False), "people", epochs=30, lr=3e-3,
                              batch_size=8, progress=False)
    assert metrics["test"]["f1"] > 0.9, metrics
    assert metrics["train"]["loss_per_epoch"][-1] < metrics["train"]["loss_per_epoch"][0]


def test_ner_determinism(tiny_bert: Path, tmp_path: Path) -> None:
    runs = []
    for sub in ("one", "two"):
        ckpt = new_ckpt(tmp_path, tiny_bert, sub)
        metrics = adapt.train_ner(ckpt, toy_ner(), "toy", epochs=2, batch_size=8, seed=7, progress=False)
        runs.append((ckpt, metrics))
    (c1, m1), (c2, m2) = runs
    assert m1 == m2
    t1, t2 = lora_tensors(c1 / "adapters/toy"), lora_tensors(c2 / "adapters/toy")
    assert t1.keys() == t2.keys()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    h1, h2 = load_file(str(c1 / "heads/toy.safetensors")), load_file(str(c2 / "heads/toy.safetensors"))
    assert all(np.array_equal(h1[k], h2[k]) for k in h1)


def test_init_adapter_starts_from_saved_weights(tiny_bert: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = new_ckpt(tmp_path, tiny_bert)
    adapt.train_ner(ckpt, toy_ner(), "first", lora_layers=1, **FAST)
    saved = lora_tensors(ckpt / "adapters/first")
    loaded: dict[str, torch.Tensor] = {}
    real_load = ck.load_adapter

    def spy(base: Any, folder: Path, arch_: Any, trainable: bool) -> Any:
        model = real_load(base, folder, arch_, trainable)
        for k, v in model.named_parameters():
            if "lora_A" in k:
                loaded[k] = v.detach().clone()
        return model

    monkeypatch.setattr(ck, "load_adapter", spy)
    # lora_layers="all" is ignored: the init adapter's own layers (only layer 1) apply.
    adapt.train_ner(ckpt, toy_ner(seed=1), "second", init_adapter="first", lora_layers="all", **FAST)
    saved_a = {k: v for k, v in saved.items() if "lora_A" in k}
    assert len(loaded) == len(saved_a) == 4
    for k, v in saved_a.items():
        match = [lv for lk, lv in loaded.items() if lk.replace(".default", "") == k]
        assert len(match) == 1 and torch.equal(match[0], v), k
    second = lora_tensors(ckpt / "adapters/second")
    assert second.keys() == saved.keys()
    assert any(not torch.equal(second[k], saved[k]) for k in saved)  # and it did train on
    cfg = json.loads((ckpt / "config.json").read_text())["tasks"]["second"]
    assert cfg["lora_layers"] == [1] and cfg["init_adapter"] == "first"


def test_ner_refuses_to_overwrite_a_foreign_adapter(tiny_bert: Path, tmp_path: Path) -> None:
    ckpt = new_ckpt(tmp_path, tiny_bert)
    adapt.train_ner(ckpt, toy_ner(), "own", **FAST)
    (ckpt / "adapters/ner").mkdir()  # e.g. a pre-finetuned adapter no task owns
    with pytest.raises(ValueError, match="already exists"):
        adapt.train_ner(ckpt, toy_ner(), "ner", **FAST)
    adapt.train_ner(ckpt, toy_ner(), "own", **FAST)  # retraining a task's own adapter is fine


# --------------------------------------------------------------------------- TC probe

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("classes", [("negative", "positive"), ("negative", "neutral", "positive")])
def test_tc_probe_separable_and_head_matches_sklearn(classes: tuple[str, ...], tiny_bert: Path,
                                                     tmp_path: Path) -> None:
    ckpt = new_ckpt(tmp_path, tiny_bert)
    ds = toy_tc(classes=classes)
    metrics = adapt.train_tc(ckpt, ds, "sentiment", progress=False)
    assert metrics["test"]["accuracy"] == 1.0 and metrics["dev"]["accuracy"] == 1.0
    task = ck.load_task(ckpt, "sentiment")
    assert task.labels == classes and task.meta["pooling"] == "mean" and task.meta["adapter"] is None
    assert task.head_weight.shape == (len(classes), 32)

    # The saved head's softmax equals sklearn's predict_proba for the same fit.
    model = AutoModel.from_pretrained(ckpt / "backbone")
    tok = AutoTokenizer.from_pretrained(ckpt / "backbone")
    x = adapt.pooled_embeddings(model, tok, [ex.text for ex in ds.train], task.meta["max_length"])
    y = np.array([classes.index(ex.label) for ex in ds.train])
    clf = LogisticRegression(C=metrics["C"], solver="lbfgs", max_iter=2000).fit(x, y)
    probs = _softmax(x.astype(np.float64) @ task.head_weight.T.astype(np.float64) + task.head_bias)
    np.testing.assert_allclose(probs, clf.predict_proba(x), atol=1e-5)


def test_tc_with_adapter_copies_it_in(tiny_bert: Path, tmp_path: Path) -> None:
    other = new_ckpt(tmp_path, tiny_bert, "other")
    adapt.train_ner(other, toy_ner(), "tcish", **FAST)
    ckpt = new_ckpt(tmp_path, tiny_bert)
    adapt.train_tc(ckpt, toy_tc(), "sent", adapter=str(other / "adapters/tcish"), progress=False)
    assert (ckpt / "adapters/tcish/adapter_model.safetensors").is_file()
    assert ck.load_task(ckpt, "sent").meta["adapter"] == "tcish"
    adapt.train_tc(ckpt, toy_tc(), "sent2", adapter="tcish", progress=False)  # by name now
    with pytest.raises(ValueError, match="not found"):
        adapt.train_tc(ckpt, toy_tc(), "sent3", adapter="missing", progress=False)


# --------------------------------------------------------------------------- checkpoint rules

def test_checkpoint_names_and_base_checks(tiny_bert: Path, tiny_distilbert: Path, tmp_path: Path) -> None:
    ckpt = new_ckpt(tmp_path, tiny_bert)
    for bad in ("", "-x", "a b", "x/y", "a" * 65, "ü"):
        with pytest.raises(ValueError, match="invalid task name"):
            ck.check_name(bad)
    with pytest.raises(ValueError, match="invalid task name"):
        adapt.train_tc(ckpt, toy_tc(), "no good", progress=False)
    assert ck.init_checkpoint(ckpt, tiny_bert) == ckpt  # same weights: accepted
    assert ck.init_checkpoint(ckpt, None) == ckpt
    with pytest.raises(ck.CheckpointError, match="differs"):
        ck.init_checkpoint(ckpt, tiny_distilbert)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.init_checkpoint(tmp_path / "fresh", None)
    with pytest.raises(ValueError, match="hub"):
        ck.resolve_base_model("bert-base-uncased")
    with pytest.raises(KeyError, match="known tasks"):
        ck.load_task(ckpt, "nothing")


# --------------------------------------------------------------------------- CLI

def test_cli_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        adapt.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for action in adapt.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out
    for opt in ("--checkpoint", "--base", "--kind", "--dataset", "--embedded", "--train", "--test",
                "--dev", "--format", "--name", "--lora-layers", "--lora-rank", "--lora-alpha",
                "--lora-targets", "--init-adapter", "--epochs", "--lr", "--batch-size", "--max-length",
                "--max-train", "--seed", "--device", "--adapter", "--no-progress"):
        assert opt in out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_errors_exit_2(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = toy_tc()
    rows = [{"text": ex.text, "label": ex.label} for ex in ds.train]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    ner = _write_jsonl(tmp_path / "ner.jsonl", [{"tokens": list(e.tokens), "tags": list(e.tags)}
                                                for e in toy_ner().train])
    cases = [
        (["--name", "bad name!", "--train", str(train), "--test", str(train)], "invalid task name"),
        (["--dataset", "no_such_dataset"], "no_such_dataset"),
        (["--train", str(train)], "--test"),
        (["--train", str(tmp_path / "missing.jsonl"), "--test", str(train)], "not found"),
        (["--lora-layers", "9", "--train", str(ner), "--test", str(ner)], "1..2"),
        (["--lora-targets", "query,nope", "--train", str(ner), "--test", str(ner)], "nope"),
        (["--embedded", "no_such_set"], "no_such_set"),
    ]
    for extra, message in cases:
        kind = "ner" if str(ner) in extra else "tc"
        with pytest.raises(SystemExit) as exc:
            adapt.main(["--checkpoint", str(tmp_path / "c"), "--base", str(tiny_bert), "--kind", kind, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2, extra
        assert message in err and "Traceback" not in err, (extra, err)


def test_cli_end_to_end_tc(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = toy_tc()
    files = {s: _write_jsonl(tmp_path / f"{s}.jsonl", [{"text": e.text, "label": e.label}
                                                        for e in getattr(ds, s)])
             for s in ("train", "dev", "test")}
    code = adapt.main(["--checkpoint", str(tmp_path / "c"), "--base", str(tiny_bert), "--kind", "tc",
                       "--train", str(files["train"]), "--dev", str(files["dev"]),
                       "--test", str(files["test"]), "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "train" and out["metrics"]["test"]["accuracy"] == 1.0
    assert ck.list_tasks(tmp_path / "c") == ["train"]
