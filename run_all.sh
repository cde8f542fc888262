#!/usr/bin/env bash
# The main job: run every notebook and write reports/index.html plus one HTML report per notebook.
# Sets up .venv on first use (not for --help).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'HELP'
Usage: ./run_all.sh [--smoke | --full | --long] [OPTIONS]

Runs notebooks/NN_*.py with papermill (what runs is the .py you edited) and writes
reports/index.html plus one HTML report per notebook. The first run creates .venv and
installs the project (a few minutes); set PNEUMO_VENV to use another folder.

  --smoke             quick plumbing run (pneumo_utils/runner/profiles/smoke.yaml): writes to reports/smoke/ and
                      saved_models/smoke/, never to the full run's results or best.json
  --full              the full profile (default); sets saved_models/best.json and
                      best.<task>.json for the other Kermany tasks
  --long              the full profile plus ResNet50 fine-tuned end to end in notebook 04
                      (pneumo_utils/runner/profiles/long.yaml; notebook 04 took 50 min on 2 cores)
  --notebooks NB ...  only these notebooks and their profile runs (prefixes such as 01 03,
                      or names); a run's name selects that run alone
  --set [NB.]KEY=VAL  override a notebook parameter (YAML literal: 3, 1e-3, null, [16, 32]);
                      KEY must be declared in the notebook's parameters cell; NB may also
                      be a profile run's name (runs: in pneumo_utils/runner/profiles/*.yaml)
  --data-root DIR     Kermany folder with {train,val,test}/{NORMAL,PNEUMONIA} (env PNEUMO_DATA_ROOT)
  --nih-root DIR      NIH ChestX-ray14 folder: label table + images (env PNEUMO_NIH_ROOT)
  --weights-dir DIR   ImageNet .h5 files under Keras' names (env PNEUMO_WEIGHTS_DIR)
  --external-dir DIR  labelled external validation set, {NORMAL,PNEUMONIA}/ (env
                      PNEUMO_EXTERNAL_DIR; default data/chest_xray_external, then
                      ../shared/data/chest_xray_official_test_a; never trained on)
  --reports-dir DIR   where reports go (default reports/, reports/smoke/ with --smoke)
  --offline           never download; fail at once if data is missing (env PNEUMO_OFFLINE=1)
  -h, --help          this help

Data is looked for in --data-root, data/chest_xray, then ../shared/data/chest_xray (NIH:
--nih-root, data/nih, data/nih_sample, ../shared/data/...); when none is there, the public
Kaggle sets are downloaded with kagglehub (no account needed; NIH: the 5,606-image sample).
Exit status: 0 every notebook ran, 1 some failed (their partial reports are kept), 2 bad
usage or missing data.
HELP
}

args=()
profile="full"
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --smoke) profile="smoke" ;;
    --full) profile="full" ;;
    --long) profile="long" ;;
    *) args+=("$arg") ;;
  esac
done
source scripts/bootstrap.sh
exec python -m pneumo_utils.runner --profile "$profile" ${args[@]+"${args[@]}"}
