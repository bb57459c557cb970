"""Opening a store by its URL: the one module that knows every backend.

It sits above ``base`` and the backends (they import ``base``, never this), so
imports in the store package flow one way. PostgreSQL's backend is imported
only when its URL is asked for, so the embedded SQLite default runs without
asyncpg installed.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from consumer.store.base import Store
from consumer.store.sqlite import SqliteStore


def _split_schema(url: str) -> tuple[str, str | None]:
    """``postgresql://...?schema=name`` puts the tables in that schema (one database, many deployments)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    schema = query.pop("schema", [None])[0]
    rest = urlencode({k: v[0] for k, v in query.items()})
    return urlunsplit(parts._replace(query=rest)), schema


def open_store(url: str, *, create: bool = True) -> Store:
    """``sqlite:///path`` (embedded default) or ``postgresql://...[?schema=name]`` (shared by workers).

    ``create=False`` (the read-only verbs) refuses a SQLite file that does not exist yet: reading
    a store in the wrong place must say so, not make an empty one and report "no records".
    """
    if url.startswith("sqlite://"):
        return SqliteStore(url.removeprefix("sqlite://").removeprefix("/") or ":memory:", create=create)
    if url.startswith(("postgresql://", "postgres://")):
        from consumer.store.postgres import PostgresStore

        base, schema = _split_schema(url)
        return PostgresStore(base, schema=schema)
    raise ValueError(f"unknown store URL scheme: {url!r}")
