#!/usr/bin/env bash
# Idempotent set-up: system libraries (OpenJPEG, Qt/VTK runtime libs) and a virtual
# environment in .venv with the project installed in editable mode.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

# System packages, checked exactly with dpkg (one query, no pipes that can lose a
# SIGPIPE race); apt runs only when one is missing, and waits for the dpkg lock.
pkgs=(libopenjp2-7 libopenjp2-tools
      # runtime libraries Qt (offscreen/xcb) and VTK (EGL/OSMesa) load on a bare Debian 12
      libgl1 libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxrender1
      # Qt's xcb platform plugin (the desktop app on a real display)
      libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
      libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1 libxcb-xfixes0
      libxcb-sync1 libxcb-shm0 libx11-xcb1
      libosmesa6)
# Debian's own python3 needs python3-venv for `python3 -m venv`
"${PYTHON:-python3}" -c "import ensurepip" >/dev/null 2>&1 || pkgs+=(python3-venv)
if command -v dpkg-query >/dev/null 2>&1; then
  bash scripts/apt-ensure.sh "${pkgs[@]}"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating virtual environment .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing Python packages"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
