#!/usr/bin/env bash
# Every benchmark in sequence (about 4 minutes on 2 cores); the RESULT lines are the figures.
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and rabbitmqctl: each benchmark makes
# and deletes a vhost of its own; bench_scaleout also needs PostgreSQL (APPT_BENCH_PG_URL,
# default postgresql://postgres@127.0.0.1:5432/test) and makes and drops a schema of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
for bench in bench_machine bench_publish bench_ingest bench_pipeline bench_anatomy bench_gc bench_latency bench_reassign bench_scaleout bench_practices bench_budget; do
    echo "== $bench"
    "$PYTHON" "bench/$bench.py"
done
