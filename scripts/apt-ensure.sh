#!/usr/bin/env bash
# Install the named Debian packages that are not installed yet; do nothing (and never
# call apt) when every one is present. Waits for the dpkg lock when another process
# holds it. Used by bootstrap.sh and by the tests that need a real peer (dcmtk, Orthanc,
# PostgreSQL, OpenJPEG's JPIP tools).
set -euo pipefail
[ $# -gt 0 ] || exit 0
missing=()
# one query for all packages; a package that dpkg does not know counts as missing
status="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$@" 2>/dev/null || true)"
for p in "$@"; do
  if ! grep -Eq "^${p//+/\\+}(:[a-z0-9]+)? ii" <<<"$status"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[apt-ensure] missing system packages (install them as root): ${missing[*]}" >&2
  exit 1
fi
echo "[apt-ensure] installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
lock=(-o DPkg::Lock::Timeout=900)
# the package lists may be absent on a fresh machine or stale; update once, then install
if ! apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get "${lock[@]}" update -qq >/dev/null
  apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
