"""Beyond one Redis: CachedStore on a real 3-master Redis Cluster started by this module.

One entity's keys (its entry and its load lease) share a hash slot through the ``{key}``
hash tag, so every Lua script touches one slot; naive key names put them in different slots
and Redis Cluster refuses the script (CROSSSLOT).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.exceptions
from tests._store_helpers import make_items_table, table_name

from sheetanchor.embedded import redis_server_bin
from sheetanchor.postgres import Database
from sheetanchor.redis import LuaScript, RedisClient
from sheetanchor.state import CachedStore, Reconciler, StoreHooks

_RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        # The cluster bus listens on port + 10000: both must be free.
        if port + 10000 <= 65535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _wait(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis Cluster: {what} not reached in {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    found = shutil.which("redis-server")
    binary = found if found else str(redis_server_bin())
    workdir: Path = tmp_path_factory.mktemp("cluster")
    ports = _cluster_ports(3)
    procs = [
        subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(workdir / f"nodes-{port}.conf"),
                "--dir",
                str(workdir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    nodes = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
    try:
        for node in nodes:
            _wait(node.ping, "PING")
        for node, (first, last) in zip(nodes, _RANGES, strict=True):
            node.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        for node in nodes[1:]:
            node.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        for node in nodes:
            _wait(lambda n=node: n.cluster("info")["cluster_state"] == "ok", "cluster_state:ok")
            _wait(lambda n=node: len(n.cluster("nodes")) == 3, "3 known nodes")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for node in nodes:
            node.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def test_naive_key_names_cross_slots_and_lua_is_refused(cluster_url: str) -> None:
    script = LuaScript("t_two", "redis.call('SET', KEYS[1], 1); return redis.call('GET', KEYS[2])")

    async def main() -> None:
        async with RedisClient(cluster_url, cluster=True) as rc:
            client = rc.cluster_client()
            cross_slot = (
                redis.exceptions.ClusterCrossSlotError,  # refused by the server
                redis.exceptions.RedisClusterException,  # or already by the client
            )
            with pytest.raises(cross_slot, match=r"(?i)slot"):
                await script(client, keys=["entity:42", "entity:42:lease"])
            # With the hash tag both keys live in one slot: the script runs.
            await script(client, keys=["entity:{42}", "entity:{42}:lease"])

    asyncio.run(main())


def test_cluster_client_is_loop_aware(cluster_url: str) -> None:
    rc = RedisClient(cluster_url, cluster=True, name="t_cluster")

    async def job(i: int) -> int:
        await rc.cluster_client().set(f"k{i}", i)
        return int(await rc.cluster_client().get(f"k{i}"))

    assert [asyncio.run(job(i)) for i in range(5)] == list(range(5))
    assert rc.stats().clients_disposed == 5


async def test_execute_command_on_a_cluster_takes_redis_pys_routed_path(cluster_url: str) -> None:
    # The lean path is for one server; on a cluster each command goes to its slot's node.
    script = LuaScript("t_cluster_exec", "return redis.call('INCR', KEYS[1])")
    async with RedisClient(cluster_url, cluster=True, name="t_cluster_exec") as rc:
        await script.load(rc.cluster_client())
        keys = [f"exec:{i}" for i in range(20)]  # spread over the three masters' slots
        for i, key in enumerate(keys):
            assert await rc.execute_command("SET", key, str(i)) is True
        assert [await rc.execute_command("GET", k) for k in keys] == [
            str(i).encode() for i in range(20)
        ]
        assert await rc.execute_command("EVALSHA", script.sha, 1, "exec:{n}") == 1
        with pytest.raises(redis.exceptions.NoScriptError):
            await rc.execute_command("EVALSHA", "0" * 40, 1, "exec:{n}")


async def test_cached_store_on_a_cluster(pg_url: str, cluster_url: str) -> None:
    table = table_name()
    async with Database(pg_url) as db, RedisClient(cluster_url, cluster=True) as rc:
        await make_items_table(db, table)
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        # 200 keys spread over the three masters: pipelines and MGET split by slot.
        await store.put_many({i: {"name": f"n{i}"} for i in range(200)})
        assert await store.get_many(range(205)) == {i: {"name": f"n{i}"} for i in range(200)}
        assert await store.get(7) == {"name": "n7"}
        assert store.stats().hits >= 1
        assert await store.delete(7)
        assert await store.get(7) is None

        # The incident's race, on the cluster: the stale backfill is refused.
        pause_read = asyncio.Event()
        resume = asyncio.Event()

        async def hook(key: Any, version: int | None) -> None:
            pause_read.set()
            await resume.wait()

        reader = CachedStore(
            db, rc, table=table, value_columns=["name"], hooks=StoreHooks(after_db_read=hook)
        )
        await rc.cluster_client().delete(store.redis_key(9))
        task = asyncio.create_task(reader.get(9))
        await asyncio.wait_for(pause_read.wait(), 30)
        await store.put(9, {"name": "newer"})
        resume.set()
        await task
        assert await store.get(9) == {"name": "newer"}

        await db.execute(f"UPDATE {table} SET name = 'behind', version = DEFAULT WHERE id = 3")
        await db.execute(f"DELETE FROM {table} WHERE id = 4")
        report = await Reconciler(store).run(repair=True)
        assert (report.stale, report.orphan, report.repaired) == (1, 1, 2)
        assert (await Reconciler(store).run()).drift == 0
        assert await store.get(3) == {"name": "behind"}


async def test_get_many_misses_on_a_cluster(pg_url: str, cluster_url: str) -> None:
    # The lease and backfill scripts of one call need one slot: a cluster takes a SET NX
    # pipeline and a script per key instead, and never starts with the lease script.
    table = table_name()
    async with Database(pg_url) as db, RedisClient(cluster_url, cluster=True) as rc:
        await make_items_table(db, table)
        await db.execute(
            f"INSERT INTO {table} (id, name) SELECT g, 'n' || g FROM generate_series(0, 99) g"
        )
        store = CachedStore(db, rc, table=table, value_columns=["name"])
        want = {i: {"name": f"n{i}"} for i in range(100)}
        store._many_miss_rate = 1.0  # as in a cold cache
        assert await store.get_many(range(105)) == want
        client = rc.cluster_client()
        rkeys = [store.redis_key(i) for i in range(100)]
        entries = await client.mget_nonatomic(rkeys)
        assert all(e is not None and e.endswith(b'"}') for e in entries)
        assert await client.mget_nonatomic([r + ":lease" for r in rkeys]) == [None] * 100
        hits = store.stats().hits
        assert await store.get_many(range(100)) == want
        assert store.stats().hits == hits + 100
