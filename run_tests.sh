#!/usr/bin/env bash
# The test command: sets up .venv on first use, generates synthetic data sets, prepares the
# notebooks and the profile's runs of them with the smoke profile on them, and runs pytest over
# the package tests and nbval over the prepared notebooks. Extra arguments go to pytest
# (e.g. -k gradcam, -x).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh

build="build/test-run"
rm -rf "$build"
mkdir -p "$build"
echo "[tests] generating synthetic data sets in $build"
python tests/synthetic.py "$build/kermany" --per-class 16 --image-size 64 --seed 0 --subtypes
python tests/synthetic.py "$build/nih" --kind nih --patients 60 --image-size 64 --seed 0
python tests/synthetic.py "$build/external" --per-class 8 --image-size 64 --seed 1 --subtypes
# nbval runs each notebook from its own folder: every path handed to the notebooks is absolute.
out="$PWD/$build"
python -m pneumo_utils.runner --profile smoke --offline --prepare-only "$build/nbval" \
  --data-root "$out/kermany" --nih-root "$out/nih" --external-dir "$out/external/test" \
  --reports-dir "$out/reports" \
  --set "models_dir=$out/saved_models" --set "cache_dir=$out/cache" \
  --set "02_nih_binary_shards.shards_dir=$out/nih-shards"
echo "[tests] pytest (package) + nbval (notebooks, smoke profile on synthetic data)"
python -m pytest tests "$build/nbval" --nbval-lax -p no:cacheprovider -n 2 --dist loadscope "$@"
