# Sourced by run_all.sh and run_tests.sh: create the project virtual environment on first use
# and (re)install the package whenever pyproject.toml changes. Needs only Python >= 3.10
# (3.11 recommended) with venv; offline machines need a reachable package index or wheel cache.
VENV="${PNEUMO_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$(command -v python3.11 || command -v python3)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.pneumo-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing pneumo and its dependencies into $VENV (first run: a few minutes)"
  LOG="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
         "$VENV/bin/python" -m pip install -e ".[${PNEUMO_EXTRAS:-cpu,dev,fetch}]"; } >"$LOG" 2>&1; then
    tail -n 30 "$LOG"
    echo "[setup] installation failed; the whole log is in $LOG" >&2
    exit 1
  fi
  # JupyterLab opens notebooks/*.py as notebooks (jupytext's viewer) for this environment.
  mkdir -p "$VENV/share/jupyter/lab/settings"
  cat > "$VENV/share/jupyter/lab/settings/overrides.json" <<'JSON'
{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}
JSON
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
