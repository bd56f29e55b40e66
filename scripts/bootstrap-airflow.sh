#!/usr/bin/env bash
# Installs Airflow 2.10.5 with its Celery and PostgreSQL providers into a cached virtualenv,
# ~/.cache/simile/airflow-venv (SIMILE_CACHE or XDG_CACHE_HOME move it), and prints its path.
# Used by scripts/airflow-test (`airflow dags test`, SQLite) and scripts/airflow-cluster-test
# (scheduler + CeleryExecutor + Redis + PostgreSQL). Idempotent and quick once complete.
#
# Airflow's constraints file is on GitHub, which these machines cannot reach, so the packages
# that matter are pinned here to the versions of Airflow 2.10.5's constraints era: without pins
# pip takes today's celery (5.5+), whose celery.backends.database no longer has what
# apache-airflow-providers-celery 3.10 imports, and the Celery worker does not start. pyarrow is
# for the cluster test's check of the neighbours tables. The import check below catches a broken
# resolution before the stamp is written. A minute or two the first time.
set -euo pipefail
PKGS=(
  "apache-airflow[celery,postgres]==2.10.5"
  "apache-airflow-providers-celery==3.10.0"
  "celery[redis]==5.4.0"
  "kombu==5.4.2"
  "redis==5.2.1"
  "flower==2.0.1"
  "apache-airflow-providers-postgres==6.0.0"
  "psycopg2-binary==2.9.10"
  "pyarrow"
)
CACHE="${SIMILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simile}"
VENV="$CACHE/airflow-venv"
# The stamp names the package set: a venv made from another list is rebuilt once.
KEY="$(printf '%s\n' "${PKGS[@]}" | cksum | cut -d' ' -f1)"
STAMP="$VENV/.simile-complete-2.10.5-$KEY"
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
echo "simile: installing ${PKGS[*]} into $VENV (once, a minute or two)" >&2
mkdir -p "$CACHE"
# Built in a temp folder then renamed, so a killed install never looks complete.
TMPV="$VENV.tmp.$$"
rm -rf "$TMPV"
python3 -m venv "$TMPV" >&2
"$TMPV/bin/python" -m pip install --quiet --upgrade pip >&2
"$TMPV/bin/python" -m pip install --quiet "${PKGS[@]}" >&2
# What the two tests import: fail here, not halfway through a test.
AIRFLOW_HOME="$TMPV/.airflow-home" "$TMPV/bin/python" - >&2 <<'EOF'
import airflow, celery, redis, psycopg2, pyarrow.parquet
import airflow.providers.celery.executors.celery_executor_utils  # noqa: F401 (the worker's app)
import airflow.providers.postgres.hooks.postgres  # noqa: F401
assert airflow.__version__ == "2.10.5", airflow.__version__
EOF
rm -rf "$TMPV/.airflow-home"
rm -rf "$VENV"
mv "$TMPV" "$VENV"
# A venv's scripts hard-code their folder: fix the shebangs after the move.
grep -rl "$TMPV" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$TMPV#$VENV#g"
touch "$STAMP"
echo "$VENV"
