"""Task adaptation: checkpoint format, learning, probe heads, determinism, CLI.

Everything runs on the tiny random encoders from conftest with toy data built here,
so the whole file takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
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


FAST = {"epochs": 1, "min_steps": 0, "batch_size": 8, "progress": False}


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
    metrics = adapt.train_ner(ckpt, toy_ner(places=False), "people", epochs=30, min_steps=0, lr=3e-3,
                              batch_size=8, progress=False)
    assert metrics["test"]["f1"] > 0.9, metrics
    assert metrics["train"]["loss_per_epoch"][-1] < metrics["train"]["loss_per_epoch"][0]


@pytest.mark.parametrize("epochs,min_steps,epochs_run", [(2, 23, 5), (2, 25, 5), (2, 26, 6), (4, 10, 4), (3, 0, 3)])
def test_min_steps_adds_epochs_on_small_sets(epochs: int, min_steps: int, epochs_run: int,
                                             tiny_bert: Path, tmp_path: Path) -> None:
    # 40 sentences at batch 8: 5 optimizer steps per epoch.
    ckpt = new_ckpt(tmp_path, tiny_bert)
    metrics = adapt.train_ner(ckpt, toy_ner(), "toy", epochs=epochs, min_steps=min_steps, batch_size=8,
                              progress=False)
    assert len(metrics["train"]["loss_per_epoch"]) == epochs_run
    cfg = json.loads((ckpt / "config.json").read_text())["tasks"]["toy"]
    assert (cfg["epochs"], cfg["min_steps"], cfg["epochs_run"], cfg["steps"]) == (epochs, min_steps, epochs_run,
                                                                                  5 * epochs_run)


def test_min_steps_must_not_be_negative(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_steps >= 0"):
        adapt.train_ner(new_ckpt(tmp_path, tiny_bert), toy_ner(), "toy", min_steps=-1, progress=False)


def test_ner_determinism(tiny_bert: Path, tmp_path: Path) -> None:
    runs = []
    for sub in ("one", "two"):
        ckpt = new_ckpt(tmp_path, tiny_bert, sub)
        metrics = adapt.train_ner(ckpt, toy_ner(), "toy", epochs=2, min_steps=0, batch_size=8, seed=7,
                                  progress=False)
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


def test_a_task_whose_weights_changed_after_its_json_is_refused(tiny_bert: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mtpf_export.bundle import ExportError, read_checkpoint_tasks

    ckpt = new_ckpt(tmp_path, tiny_bert)
    adapt.train_ner(ckpt, toy_ner(), "ents", **FAST)
    adapt.train_tc(ckpt, toy_tc(), "sent", progress=False)
    files = json.loads((ckpt / "tasks/ents.json").read_text())["files"]
    assert files == {"head_sha256": ck.sha256_file(ckpt / "heads/ents.safetensors"),
                     "adapter_sha256": ck.sha256_file(ckpt / "adapters/ents/adapter_model.safetensors")}

    # Re-training "ents" stops after its new adapter is written, before its head and json.
    write = ck._atomic_write_bytes

    def stop_at_head(path: Path, data: bytes) -> None:
        if path.name == "ents.safetensors":
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(ck, "_atomic_write_bytes", stop_at_head)
    with pytest.raises(KeyboardInterrupt):
        adapt.train_ner(ckpt, toy_ner(seed=1), "ents", **FAST)
    monkeypatch.setattr(ck, "_atomic_write_bytes", write)
    with pytest.raises(ck.CheckpointError, match="task 'ents'.*its adapter weights are not the ones"):
        ck.load_task(ckpt, "ents")
    ck.load_task(ckpt, "sent")  # the other task is untouched
    with pytest.raises(ExportError, match="train the task again"):
        read_checkpoint_tasks(ckpt, ["ents"])
    adapt.train_ner(ckpt, toy_ner(seed=1), "ents", **FAST)  # training it again mends it
    assert ck.load_task(ckpt, "ents").meta["files"]["adapter_sha256"] != files["adapter_sha256"]

    # A head replaced by hand.
    (ckpt / "heads/sent.safetensors").write_bytes((ckpt / "heads/ents.safetensors").read_bytes())
    with pytest.raises(ck.CheckpointError, match="task 'sent'.*its head weights"):
        ck.load_task(ckpt, "sent")


# --------------------------------------------------------------------------- interrupt and resume

def _raise_after(fn: Any, calls: int) -> Any:
    """``fn``, except that call number ``calls + 1`` raises KeyboardInterrupt (a Ctrl-C)."""
    seen = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        if seen[0] > calls:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    return wrapped


def _files(ckpt: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def _assert_same_task(a: Path, b: Path, task: str) -> None:
    """Bit-identical adapter (if any), head and task file."""
    for rel in (f"heads/{task}.safetensors", f"tasks/{task}.json", f"adapters/{task}/adapter_model.safetensors"):
        assert (a / rel).is_file() == (b / rel).is_file(), rel
        if (a / rel).is_file():
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


NER_RUN = {"epochs": 3, "min_steps": 0, "batch_size": 8, "seed": 3, "progress": False}  # 40 sentences: 5 steps an epoch


@pytest.mark.parametrize("steps_done, every, continues_at", [
    (7, 2, (1, 1)),  # the step-6 state: epoch 2, after its first batch; step 7 is redone
    (11, 0, (2, 0)),  # only epoch states: the one after epoch 2; step 11 is redone
])
def test_interrupted_ner_run_resumes_bit_identical(steps_done: int, every: int, continues_at: tuple[int, int],
                                                   tiny_bert: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole = new_ckpt(tmp_path, tiny_bert, "whole")
    expected = adapt.train_ner(whole, toy_ner(), "toy", **NER_RUN)

    parts = new_ckpt(tmp_path, tiny_bert, "parts")
    before = _files(parts)
    with monkeypatch.context() as m:  # upper_forward runs once per training step
        m.setattr(adapt, "upper_forward", _raise_after(adapt.upper_forward, steps_done))
        with pytest.raises(KeyboardInterrupt):
            adapt.train_ner(parts, toy_ner(), "toy", checkpoint_every=every, **NER_RUN)
    # Nothing of the task reached the checkpoint: only its state, and no temporary file.
    after = _files(parts)
    assert after.keys() - before.keys() == {"resume/toy.pt"}
    assert all(after[k] == v for k, v in before.items())
    state = ck.load_state(parts / "resume/toy.pt")
    assert (state["epoch"], state["batch"]) == continues_at

    got = adapt.train_ner(parts, toy_ner(), "toy", resume=True, checkpoint_every=every, **NER_RUN)
    assert got == expected  # metrics, train losses per epoch included
    _assert_same_task(whole, parts, "toy")
    assert json.loads((parts / "config.json").read_text())["tasks"]["toy"] == \
        json.loads((whole / "config.json").read_text())["tasks"]["toy"]
    assert not (parts / "resume").exists()


def test_ner_state_of_another_run_is_refused(tiny_bert: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = new_ckpt(tmp_path, tiny_bert)
    with monkeypatch.context() as m:
        m.setattr(adapt, "upper_forward", _raise_after(adapt.upper_forward, 6))
        with pytest.raises(KeyboardInterrupt):
            adapt.train_ner(ckpt, toy_ner(), "toy", **NER_RUN)
    state = (ckpt / "resume/toy.pt").read_bytes()
    other_data = dataclasses.replace(toy_ner(seed=1), name="other_ner")
    for change, message in [
        ({"seed": 4}, "seed 3 -> 4"),
        ({"lora_rank": 8}, "lora_rank 32 -> 8"),
        ({"lr": 1e-2}, "lr 0.001 -> 0.01"),
        ({"dataset": other_data}, "dataset 'toy_ner' -> 'other_ner'"),
        ({"dataset": toy_ner(seed=1)}, "train_sha256 '"),  # same name, other sentences
    ]:
        kw = {**NER_RUN, "dataset": toy_ner(), **change}
        with pytest.raises(ck.CheckpointError, match=re.escape(message)) as exc:
            adapt.train_ner(ckpt, kw.pop("dataset"), "toy", resume=True, **kw)
        assert "cannot resume" in str(exc.value) and "delete" in str(exc.value)
    assert (ckpt / "resume/toy.pt").read_bytes() == state  # refusing touches nothing
    assert ck.list_tasks(ckpt) == []


TC_RUN = {"batch_size": 4, "seed": 0, "progress": False}


def _tc_batches(ds: Dataset) -> dict[str, int]:
    """Embedding batches per split: each split embeds the texts no earlier split had."""
    seen: set[str] = set()
    out = {}
    for split in ("train", "dev", "test"):
        new = {ex.text for ex in getattr(ds, split)} - seen
        out[split], seen = math.ceil(len(new) / TC_RUN["batch_size"]), seen | new
    return out


@pytest.mark.parametrize("where", ["inside train, every 2 batches", "inside test, splits only"])
def test_interrupted_tc_run_resumes_bit_identical(where: str, tiny_bert: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ds = toy_tc()
    n = _tc_batches(ds)
    assert n["train"] >= 4 and n["dev"] >= 1 and n["test"] >= 1
    if where.startswith("inside train"):  # batch 3 of train is redone
        every, done, saved = 2, 3, {"train": 2}
    else:  # the first test batch is interrupted
        every, done, saved = 0, n["train"] + n["dev"], {"train": n["train"], "dev": n["dev"]}
    whole = new_ckpt(tmp_path, tiny_bert, "whole")
    expected = adapt.train_tc(whole, ds, "sent", **TC_RUN)

    parts = new_ckpt(tmp_path, tiny_bert, "parts")
    before = _files(parts)
    with monkeypatch.context() as m:  # _pooled_batch runs once per embedding batch
        m.setattr(adapt, "_pooled_batch", _raise_after(adapt._pooled_batch, done))
        with pytest.raises(KeyboardInterrupt):
            adapt.train_tc(parts, ds, "sent", checkpoint_every=every, **TC_RUN)
    after = _files(parts)
    assert after.keys() - before.keys() == {"resume/sent.pt"}
    assert all(after[k] == v for k, v in before.items())
    state = ck.load_state(parts / "resume/sent.pt")
    assert {k: v["batches"] for k, v in state["passes"].items()} == saved

    calls = [0]
    real = adapt._pooled_batch

    def counting(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real(*a, **k)

    with monkeypatch.context() as m:  # the resumed run embeds only the batches the state lacks
        m.setattr(adapt, "_pooled_batch", counting)
        got = adapt.train_tc(parts, ds, "sent", resume=True, checkpoint_every=every, **TC_RUN)
    assert calls[0] == sum(n.values()) - sum(saved.values())
    assert got == expected
    _assert_same_task(whole, parts, "sent")
    assert not (parts / "resume").exists()

    # A state saved with other settings or data is refused, naming what differs.
    with monkeypatch.context() as m:
        m.setattr(adapt, "_pooled_batch", _raise_after(adapt._pooled_batch, 1))
        with pytest.raises(KeyboardInterrupt):
            adapt.train_tc(parts, ds, "again", checkpoint_every=1, **TC_RUN)
    for change, message in [({"seed": 1}, "seed 0 -> 1"), ({"max_length": 64}, "max_length 128 -> 64"),
                            ({"max_train": 20}, "max_train None -> 20")]:
        with pytest.raises(ck.CheckpointError, match=re.escape(message)):
            adapt.train_tc(parts, ds, "again", resume=True, **{**TC_RUN, **change})
    with pytest.raises(ck.CheckpointError, match="data_sha256"):
        adapt.train_tc(parts, toy_tc(seed=1), "again", resume=True, **TC_RUN)


def test_cli_interrupt_then_resume(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ds = toy_tc()
    files = {s: _write_jsonl(tmp_path / f"{s}.jsonl", [{"text": e.text, "label": e.label}
                                                        for e in getattr(ds, s)])
             for s in ("train", "test")}
    argv = ["--checkpoint", str(tmp_path / "c"), "--base", str(tiny_bert), "--kind", "tc", "--name", "sent",
            "--train", str(files["train"]), "--test", str(files["test"]), "--no-progress",
            "--batch-size", "4", "--checkpoint-every", "1"]
    with monkeypatch.context() as m:
        m.setattr(adapt, "_pooled_batch", _raise_after(adapt._pooled_batch, 2))
        with pytest.raises(SystemExit) as exc:
            adapt.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "--resume" in err and "resume/sent.pt" in err, err
    assert adapt.main([*argv, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["test"]["accuracy"] == 1.0
    assert not (tmp_path / "c/resume").exists()


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
                "--lora-targets", "--init-adapter", "--epochs", "--min-steps", "--lr", "--batch-size", "--max-length",
                "--max-train", "--seed", "--device", "--adapter", "--no-progress", "--resume",
                "--checkpoint-every"):
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
