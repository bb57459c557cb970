#!/usr/bin/env bash
# Make sure RabbitMQ (and, with "postgres", what the tests also need: PostgreSQL and RabbitMQ's
# management API) answer on loopback, starting them when they are installed but stopped. Idempotent.
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port name seconds
  for _ in $(seq 1 "$3"); do answers "$1" && return 0; sleep 1; done
  echo "error: $2 did not answer on 127.0.0.1:$1 after $3 s" >&2; return 1
}

ensure_rabbitmq() {
  if ! answers 5672; then
    if ! command -v rabbitmq-server >/dev/null; then
      echo "error: RabbitMQ is not installed: apt-get install rabbitmq-server, or run 'docker compose -f docker/compose.yml up rabbitmq'" >&2
      return 1
    fi
    echo "starting RabbitMQ..." >&2
    rabbitmq-server -detached
    wait_for 5672 RabbitMQ 90
  fi
  # The partitioned inbound exchange needs the consistent-hash plugin (ships with RabbitMQ).
  enable_plugin rabbitmq_consistent_hash_exchange
}

enable_plugin() {  # name: a plugin bundled with RabbitMQ
  if command -v rabbitmq-plugins >/dev/null; then
    rabbitmq-plugins list -e -m 2>/dev/null | grep -qx "$1" || rabbitmq-plugins enable "$1" >/dev/null
  fi
}

# The tests make a vhost each through the management plugin's HTTP API (tests/conftest.py;
# without it they fall back to rabbitmqctl, ~2 s a test). Not for `scripts/run`: the service needs none of it.
ensure_management_api() {
  enable_plugin rabbitmq_management
  wait_for 15672 "RabbitMQ's management API" 60 \
    || echo "warning: the tests will make their vhosts with rabbitmqctl (slower)" >&2
}

ensure_postgres() {
  if ! answers 5432; then
    if ! command -v pg_ctlcluster >/dev/null; then
      echo "error: PostgreSQL is not installed: apt-get install postgresql, or run 'docker compose -f docker/compose.yml up postgres'" >&2
      return 1
    fi
    echo "starting PostgreSQL..." >&2
    for version in /etc/postgresql/*; do
      pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
    wait_for 5432 PostgreSQL 60
  fi
}

ensure_rabbitmq
if [[ "${1:-}" == "postgres" ]]; then ensure_postgres; ensure_management_api; fi
