#!/usr/bin/env bash
# Make sure RabbitMQ (and, with "postgres", PostgreSQL) answer on loopback,
# starting them when they are installed but stopped. Idempotent.
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
  # The partitioned inbound exchange needs the consistent-hash plugin; the tests create a vhost
  # each through the management plugin's HTTP API (both ship with RabbitMQ).
  if command -v rabbitmq-plugins >/dev/null; then
    local enabled
    enabled=$(rabbitmq-plugins list -e -m 2>/dev/null || true)
    for plugin in rabbitmq_consistent_hash_exchange rabbitmq_management; do
      grep -qx "$plugin" <<<"$enabled" || rabbitmq-plugins enable "$plugin" >/dev/null
    done
    wait_for 15672 "RabbitMQ's management API" 60
  fi
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
if [[ "${1:-}" == "postgres" ]]; then ensure_postgres; fi
