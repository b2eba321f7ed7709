#!/usr/bin/env bash
# Test suite: set up (first time only), then run pytest headless, on both engines:
#   1. every test, each store's tables in SQLite (the embedded default); this pass notes
#      which tests touched a database (tests/conftest.py);
#   2. those tests again with every store's tables in PostgreSQL (a throwaway cluster
#      started by the tests).
# MEDVIEW_TEST_DATABASE=postgresql ./test.sh runs every test once, on PostgreSQL;
# MEDVIEW_TEST_DATABASE=sqlite ./test.sh every test once, on SQLite.
# MEDVIEW_TEST_WORKERS=N: pytest-xdist workers, each taking whole files (default 2;
# 0: none, all in this process). Workers share the PostgreSQL cluster, nothing else.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
export QT_QPA_PLATFORM=offscreen
workers=${MEDVIEW_TEST_WORKERS:-2}
par=()
if [ "$workers" != 0 ]; then par=(-n "$workers" --dist loadfile); fi
if [ -n "${MEDVIEW_TEST_DATABASE:-}" ]; then
  exec .venv/bin/python -m pytest -q "${par[@]}" "$@"
fi
list=$(mktemp "${TMPDIR:-/tmp}/medview-db-tests.XXXXXX")
trap 'rm -f "$list"' EXIT
rc=0
echo "== pass 1: every test on SQLite"
MEDVIEW_TEST_DB_TESTS=$list .venv/bin/python -m pytest -q "${par[@]}" "$@" || rc=$?
echo "== pass 2: the $(wc -l <"$list") tests that touched a database, on PostgreSQL"
MEDVIEW_TEST_DB_TESTS=$list MEDVIEW_TEST_DATABASE=postgresql \
  .venv/bin/python -m pytest -q "${par[@]}" "$@" || { r=$?; [ "$r" = 5 ] || rc=$r; }
exit "$rc"
