#!/usr/bin/env bash
# Idempotent set-up: system libraries (OpenJPEG, Qt/VTK runtime libs) and a virtual
# environment in .venv with the project installed in editable mode.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

need_apt=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib libopenjp2.so.7 || need_apt+=(libopenjp2-7)
command -v opj_decompress >/dev/null 2>&1 || need_apt+=(libopenjp2-tools)
# Runtime libraries Qt (offscreen/xcb) and VTK (EGL/OSMesa) load on a bare Debian 12.
have_lib libGL.so.1 || need_apt+=(libgl1)
have_lib libEGL.so.1 || need_apt+=(libegl1)
have_lib libxkbcommon.so.0 || need_apt+=(libxkbcommon0)
have_lib libfontconfig.so.1 || need_apt+=(libfontconfig1)
have_lib libdbus-1.so.3 || need_apt+=(libdbus-1-3)
have_lib libglib-2.0.so.0 || need_apt+=(libglib2.0-0)
have_lib libXrender.so.1 || need_apt+=(libxrender1)
# Qt's xcb platform plugin (the desktop app on a real display)
for pair in libxkbcommon-x11.so.0:libxkbcommon-x11-0 libxcb-cursor.so.0:libxcb-cursor0 \
            libxcb-icccm.so.4:libxcb-icccm4 libxcb-image.so.0:libxcb-image0 \
            libxcb-keysyms.so.1:libxcb-keysyms1 libxcb-randr.so.0:libxcb-randr0 \
            libxcb-render-util.so.0:libxcb-render-util0 libxcb-shape.so.0:libxcb-shape0 \
            libxcb-xkb.so.1:libxcb-xkb1 libxcb-xfixes.so.0:libxcb-xfixes0 \
            libxcb-sync.so.1:libxcb-sync1 libxcb-shm.so.0:libxcb-shm0 libX11-xcb.so.1:libx11-xcb1; do
  have_lib "${pair%%:*}" || need_apt+=("${pair##*:}")
done
have_lib libOSMesa.so || need_apt+=(libosmesa6)
# Debian's own python3 needs python3-venv for `python3 -m venv`
"${PYTHON:-python3}" -c "import ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "[bootstrap] missing system packages (install them as root): ${need_apt[*]}" >&2
  fi
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
