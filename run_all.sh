#!/usr/bin/env bash
# Execute every notebook with papermill, render an HTML report for each into reports/, and
# write reports/index.html with the headline metrics. Sets up .venv on first use.
#
#   ./run_all.sh [--smoke] [--data-root DIR] [--nih-root DIR] [--weights-dir DIR] [RUNNER OPTIONS]
#
#   --smoke           quick plumbing run: a few images per class, 1 epoch (profile smoke)
#   --full            the full profile (default)
#   --data-root DIR   Kermany root with {train,val,test}/{NORMAL,PNEUMONIA} (env PNEUMO_DATA_ROOT)
#   --nih-root DIR    NIH folder with images/ and the label CSV (env PNEUMO_NIH_ROOT)
#   --weights-dir DIR ImageNet .h5 files under Keras' names (env PNEUMO_WEIGHTS_DIR)
# Any other option goes to `python -m pneumo_utils.runner` (see --help there), e.g.
#   --notebooks 01 03   --set 01.backbone=resnet50   --set epochs=5
# Exit status: 0 when every notebook ran, 1 when any failed (its partial report is kept).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh

args=()
profile="full"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) profile="smoke" ;;
    --full) profile="full" ;;
    *) args+=("$1") ;;
  esac
  shift
done
exec python -m pneumo_utils.runner --profile "$profile" "${args[@]}"
