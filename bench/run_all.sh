#!/usr/bin/env bash
# Every benchmark in sequence (about 3 minutes on 2 cores); the RESULT lines are the figures.
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and rabbitmqctl: each benchmark makes
# and deletes a vhost of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
for bench in bench_machine bench_ingest bench_pipeline bench_latency bench_reassign; do
    echo "== $bench"
    "$PYTHON" "bench/$bench.py"
done
