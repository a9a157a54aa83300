"""Views of a ``tpl`` checkpoint for the NER question of docs/results.md (session 18).

Usage::

    python docs/reproduce/ner_views.py CHECKPOINT merged|fresh OUT

- ``merged``: ``OUT/backbone`` is the checkpoint's encoder with ``pf_ner`` merged into its weights
  (PEFT ``merge_and_unload``), and OUT has no ``pf_ner``. ``mtpf-compare`` then gives each NER task
  a fresh LoRA over an encoder that already holds ``pf_ner``: ``pf_ner`` frozen, a new LoRA beside
  it, instead of training ``pf_ner`` itself on.
- ``fresh``: the same encoder files (a symlink), no ``pf_ner``: each NER task gets a fresh LoRA and
  ``pf_ner`` is not used at all.

``pf_tc`` is linked into both, so TC runs are unchanged. ``config.json`` records the view and,
for ``merged``, the new encoder's sha256 (what ``mtpf-compare`` fingerprints).
"""
import json
import shutil
import sys
from pathlib import Path

from mtpf_training import checkpoint as ck


def main(src: Path, kind: str, out: Path) -> None:
    if kind not in ("merged", "fresh"):
        raise SystemExit(f"kind {kind!r}: choose merged or fresh")
    if not (src / "adapters" / "pf_ner" / "adapter_config.json").is_file():
        raise SystemExit(f"{src} has no adapters/pf_ner: views are for tpl checkpoints")
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    cfg = ck.read_config(src)
    out.mkdir(parents=True)
    if kind == "fresh":
        (out / "backbone").symlink_to((src / "backbone").resolve())
    else:
        base, tokenizer, arch = ck.load_backbone(src)
        merged = ck.load_adapter(base, src / "adapters" / "pf_ner", arch, trainable=False).merge_and_unload()
        merged.save_pretrained(out / "backbone")
        tokenizer.save_pretrained(out / "backbone")
        cfg["backbone_sha256"] = ck.sha256_file(out / "backbone" / "model.safetensors")
    if (src / "adapters" / "pf_tc").is_dir():
        (out / "adapters").mkdir()
        (out / "adapters" / "pf_tc").symlink_to((src / "adapters" / "pf_tc").resolve())
    cfg["view"] = {"of": str(src.resolve()), "kind": kind}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copy(src / "metrics.json", out / "metrics.json")
    print(out, cfg["backbone_sha256"][:12])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
