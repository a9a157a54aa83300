"""The real all-MiniLM-L6-v2, trained on real data, through the exported bundles.

One module-scoped checkpoint: a CoNLL-2003 NER adapter (1,000 sentences, 2 epochs) and an
SST-2 probe (1,000 sentences) — small, but trained, so INT8 agreement is measured on a
model with real decision margins rather than on random heads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import minilm_dir, require_data

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

N_EVAL = 300  # test sentences per task for parity and agreement


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_data()
    base = minilm_dir()
    from mtpf_export.bundle import export_bundle
    from mtpf_training.adapt import train_ner, train_tc
    from mtpf_training.checkpoint import init_checkpoint
    from mtpf_training.data import load_dataset

    root = tmp_path_factory.mktemp("minilm")
    ckpt = init_checkpoint(root / "ckpt", base)
    conll, sst2 = load_dataset("conll2003"), load_dataset("sst2")
    ner_m = train_ner(ckpt, conll, "conll", max_train=1000, epochs=2, min_steps=0, progress=False)
    tc_m = train_tc(ckpt, sst2, "sst2", max_train=1000, progress=False)
    quiet = {"log": lambda *a: None}
    return {
        "ckpt": ckpt, "conll": conll, "sst2": sst2, "ner_metrics": ner_m, "tc_metrics": tc_m,
        "fp32": export_bundle(ckpt, root / "fp32", precision="fp32", **quiet) and root / "fp32",
        "int8": export_bundle(ckpt, root / "int8", precision="int8", **quiet) and root / "int8",
    }


def test_training_learned_something(trained: dict) -> None:
    """Sanity floors well below DESIGN.md's reference numbers for full-size training."""
    assert trained["ner_metrics"]["test"]["f1"] > 0.30
    assert trained["tc_metrics"]["test"]["accuracy"] > 0.70


def _sentences(ds, n: int) -> list[str]:
    return [" ".join(ex.tokens) for ex in ds.test[:n]]


def test_fp32_bundle_matches_torch_on_real_text(trained: dict) -> None:
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModel

    from mtpf_runtime import Runtime

    ckpt = trained["ckpt"]
    rt = Runtime(trained["fp32"])
    texts = _sentences(trained["conll"], 40) + [ex.text for ex in trained["sst2"].test[:40]]
    rows = [e.ids[:126] for e in rt._tok.encode_batch(texts, add_special_tokens=False)]
    for task, kind in (("conll", "ner"), ("sst2", "tc")):
        model = AutoModel.from_pretrained(ckpt / "backbone")
        meta = json.loads((ckpt / "tasks" / f"{task}.json").read_text())
        if meta["adapter"]:
            model = PeftModel.from_pretrained(model, ckpt / "adapters" / meta["adapter"])
        model.eval()
        head = load_file(str(ckpt / "heads" / f"{task}.safetensors"))
        got = rt.token_logits(rows, task) if kind == "ner" else list(rt.logits(texts, task))
        worst = 0.0
        with torch.no_grad():
            for r, g in zip(rows, got):
                ids = torch.tensor([[101, *r, 102]])
                h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].numpy()
                h = h[1:-1] if kind == "ner" else h.mean(0)
                worst = max(worst, float(np.abs(h @ head["weight"].T + head["bias"] - g).max()))
        assert worst <= 1e-4, f"{task}: fp32 bundle differs from torch+PEFT by {worst:.2e}"


def test_int8_agrees_with_fp32_on_real_data(trained: dict) -> None:
    from mtpf_runtime import Runtime

    fp, q = Runtime(trained["fp32"]), Runtime(trained["int8"])
    # NER: token labels (first word piece of every word) on CoNLL test sentences.
    rows = [e.ids for e in fp._tok.encode_batch(_sentences(trained["conll"], N_EVAL), add_special_tokens=False)]
    a = np.concatenate([x.argmax(-1) for x in fp.token_logits(rows, "conll")])
    b = np.concatenate([x.argmax(-1) for x in q.token_logits(rows, "conll")])
    token_agreement = float((a == b).mean())
    # TC: sentence labels on SST-2 test.
    texts = [ex.text for ex in trained["sst2"].test[:N_EVAL]]
    la = [c.label for c in fp.classify(texts, task="sst2")]
    lb = [c.label for c in q.classify(texts, task="sst2")]
    sentence_agreement = float(np.mean([x == y for x, y in zip(la, lb)]))
    assert token_agreement >= 0.98, token_agreement
    assert sentence_agreement >= 0.98, sentence_agreement


def test_int8_entities_have_exact_offsets(trained: dict) -> None:
    """Entities slice the caller's string exactly and fall on the gold words' boundaries."""
    from mtpf_runtime import Runtime

    rt = Runtime(trained["int8"])
    sents = trained["conll"].test[:N_EVAL]
    texts = [" ".join(ex.tokens) for ex in sents]
    found = 0
    for ex, text, ents in zip(sents, texts, rt.tag(texts, task="conll")):
        gold_starts = {len(" ".join(ex.tokens[:i])) + (1 if i else 0) for i in range(len(ex.tokens))}
        for e in ents:
            found += 1
            assert text[e.start:e.end] == e.text and e.text == e.text.strip() and e.text
            # Entities begin on a word: a gold token start or a punctuation split inside one.
            assert e.start in gold_starts or not text[e.start - 1].isalnum() or not text[e.start].isalnum()
        # Entities in order, never overlapping.
        for x, y in zip(ents, ents[1:]):
            assert x.end <= y.start
    assert found > 50


def test_multi_task_bundle_serves_both_from_one_session(trained: dict) -> None:
    from mtpf_runtime import Runtime

    rt = Runtime(trained["int8"])
    assert {t.name for t in rt.tasks} == {"conll", "sst2"}
    ents = rt.tag("Angela Merkel visited the European Union office in Brussels.", task="conll")
    assert {"PER", "LOC"} & {e.label for e in ents}
    assert rt.classify("a wonderful, moving film", task="sst2").label == "positive"
    assert rt.classify("a dull, lifeless and tedious mess", task="sst2").label == "negative"


def _wide_ner_bundle(src, dest, n_types: int = 10):
    """A copy of ``src`` whose NER task has ``n_types`` entity types (2n + 1 BIO labels, as
    WNUT-16's 10 types give 21) and a random head of that width, the manifest's sha256 updated."""
    import shutil

    from mtpf_runtime.manifest import sha256_file

    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    task = m["tasks"]["conll"]
    task["labels"] = ["O"] + [f"{p}-T{i}" for i in range(n_types) for p in ("B", "I")]
    rng = np.random.default_rng(0)
    shape = (len(task["labels"]), m["backbone"]["hidden_size"])
    np.savez(dest / task["head"], weight=rng.standard_normal(shape).astype(np.float32) * 0.05,
             bias=np.zeros(len(task["labels"]), np.float32))
    m["files"][task["head"]] = sha256_file(dest / task["head"])
    (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def test_no_thread_keeps_working_after_a_request(trained: dict, tmp_path) -> None:
    """Once a call returns, nothing the Runtime started keeps a core busy.

    ONNX Runtime's worker threads sleep between runs (``spin=False``), and the heads' products
    do not go through numpy's multi-threaded BLAS, whose threads spin for about 100 ms after a
    product of this size: CPU a phone would spend after every request. The CPU time of the
    whole process is read across a pause after each call; no thread of this test runs then.
    """
    import os
    import time

    from mtpf_runtime import Runtime

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: no worker thread to keep spinning")
    # 21 labels and a full 128-token window: the head product numpy's OpenBLAS threads (CoNLL's
    # 9 labels stay under its threading threshold).
    rt = Runtime(_wide_ner_bundle(trained["int8"], tmp_path / "wide"))  # all cores, as an app opens it
    text = " ".join(" ".join(ex.tokens) for ex in trained["conll"].test[:12])
    assert len(rt._encode([text])[0].ids) > 126
    calls = {"tag": lambda: rt.tag(text, task="conll"), "classify": lambda: rt.classify(text, task="sst2"),
             "analyze": lambda: rt.analyze(text, ["conll", "sst2"])}
    for name, call in calls.items():
        call()
        c0 = time.process_time()
        time.sleep(0.2)
        burnt_ms = (time.process_time() - c0) * 1e3
        assert burnt_ms < 20, f"{name}: the process used {burnt_ms:.0f} ms of CPU in the 200 ms after the call"
