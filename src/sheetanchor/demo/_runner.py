"""Runs drills against real servers: the machine's (URL variables) or embedded ones."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sheetanchor.config import pg_url_from_env, redact, redis_url_from_env, to_asyncpg_dsn
from sheetanchor.demo._drill import DemoContext, Drill, DrillResult
from sheetanchor.observe import get_logger

__all__ = ["DemoServers", "resolve_servers", "run_drills", "with_database"]

_log = get_logger("demo")


@dataclass(frozen=True, slots=True)
class DemoServers:
    """Where the demo runs: URLs and whether they came from the environment or the wheels."""

    pg_url: str
    redis_url: str
    source: str


def resolve_servers() -> DemoServers:
    """Servers from ``SHEETANCHOR_PG_URL``/``SHEETANCHOR_REDIS_URL`` where set, else embedded."""
    pg, redis = pg_url_from_env(), redis_url_from_env()
    if pg and redis:
        return DemoServers(pg, redis, "environment")
    from sheetanchor.embedded import EmbeddedPostgres, EmbeddedRedis

    source = "embedded" if not (pg or redis) else "environment + embedded"
    return DemoServers(pg or EmbeddedPostgres().start(), redis or EmbeddedRedis().start(), source)


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at ``database`` instead (query string kept)."""
    base, sep, query = url.partition("?")
    scheme, rest = base.split("://", 1)
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{database}{sep}{query}"


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(to_asyncpg_dsn(url), timeout=30)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run_drills(
    drills: Sequence[Drill],
    servers: DemoServers,
    workdir: Path,
    *,
    on_start: Callable[[Drill], None] | None = None,
    on_done: Callable[[DrillResult], None] | None = None,
) -> list[DrillResult]:
    """Run each drill in turn; a drill that crashes is reported as failed, never hidden."""
    created: list[str] = []

    async def fresh_database(prefix: str) -> str:
        name = f"sa_demo_{prefix}_{uuid.uuid4().hex[:8]}"
        # template0: template1 may have other sessions on a shared server, which fails the copy.
        await _admin(servers.pg_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
        created.append(name)
        return with_database(servers.pg_url, name)

    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    ctx = DemoContext(servers.pg_url, servers.redis_url, workdir, fresh_database)
    results: list[DrillResult] = []
    try:
        for drill in drills:
            if on_start is not None:
                on_start(drill)
            started = time.monotonic()
            try:
                result = await drill.run(ctx)
            except Exception as exc:  # noqa: BLE001  (reported as a failed drill, not swallowed)
                _log.exception("drill %s crashed", drill.id)
                result = DrillResult(
                    drill=drill.id,
                    title=drill.title,
                    naive="not reached",
                    naive_failed=False,
                    ours=redact(f"drill crashed: {type(exc).__name__}: {exc}"),
                    ours_ok=False,
                    seconds=time.monotonic() - started,
                )
            results.append(result)
            if on_done is not None:
                on_done(result)
    finally:
        await _drop_all(servers.pg_url, created)
    return results


async def _drop_all(admin_url: str, names: list[str]) -> None:
    """Drop every database the drills made; one failure must not hide the results or the rest."""
    for name in names:
        try:
            await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001  (logged with the name so it can be dropped by hand)
            _log.warning("could not drop demo database %s: %s", name, redact(str(exc)))
