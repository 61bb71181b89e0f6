"""API keys and quotas against a real Redis: hashing, scopes, expiry, revocation, the first admin
key, and quotas that hold across two independent clients (two gateway replicas)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio

from libs.common.errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from services.gateway.keys import KeyStore, digest
from services.gateway.quota import Quotas
from tests.helpers.redis_server import RedisServer

T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def run(server: RedisServer, body: Any) -> Any:
    """Run `body(client)` on a fresh client and event loop, the database emptied first."""

    async def main() -> Any:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        await client.flushdb()
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def fails(awaitable: Awaitable[T], error: type[Exception]) -> Awaitable[Exception]:
    async def check() -> Exception:
        with pytest.raises(error) as e:
            await awaitable
        return e.value

    return check()


def test_a_key_is_stored_only_as_its_hash_and_carries_its_scopes(server: RedisServer) -> None:
    async def body(client: Any) -> None:
        keys = KeyStore(client)
        new = await keys.create("ci", ["inference", "retrieval"])
        assert new.key.startswith(f"llmp_{new.record.id}_") and len(new.key) > 50
        dump = {k: await client.hgetall(k) for k in await client.keys("*")}
        assert new.key not in repr(dump) and f"llmp:gateway:key:{digest(new.key)}" in dump
        assert (await keys.authorize(new.key, "inference")).id == new.record.id
        error = await fails(keys.authorize(new.key, "training"), PermissionDenied)
        assert "training" in str(error)
        await fails(keys.verify(new.key + "x"), Unauthenticated)
        await fails(keys.verify(""), Unauthenticated)
        await fails(keys.create("bad", ["root"]), InvalidArgument)

    run(server, body)


def test_expired_and_revoked_keys_are_refused(server: RedisServer) -> None:
    async def body(client: Any) -> None:
        now = [1000.0]
        keys = KeyStore(client, clock=lambda: now[0])
        short = await keys.create("short", ["inference"], ttl_seconds=60)
        await keys.verify(short.key)
        now[0] += 61
        assert "expired" in str(await fails(keys.verify(short.key), Unauthenticated))
        other = await keys.create("other", ["admin"])
        assert (await keys.authorize(other.key, "training")).allows("tokenizer")  # admin allows everything
        await keys.revoke(other.record.id)
        assert "revoked" in str(await fails(keys.verify(other.key), Unauthenticated))
        assert [(r.name, r.revoked) for r in await keys.list()] == [("short", False), ("other", True)]
        await fails(keys.revoke("nope"), NotFound)

    run(server, body)


def test_first_admin_key_is_written_once_owner_only(server: RedisServer, tmp_path: Path) -> None:
    async def body(client: Any) -> tuple[str, str]:
        keys = KeyStore(client)
        path = await keys.bootstrap("", tmp_path)
        assert path is not None
        first = path.read_text().strip()
        assert (await keys.authorize(first, "admin")).allows("admin")
        assert await keys.bootstrap("", tmp_path) == path and path.read_text().strip() == first
        await client.flushdb()  # Redis emptied: the key in the file is registered again, not replaced
        await keys.bootstrap("", tmp_path)
        await keys.authorize(first, "admin")
        return first, oct(stat.S_IMODE(os.stat(path).st_mode)) + oct(stat.S_IMODE(os.stat(path.parent).st_mode))

    _, modes = run(server, body)
    assert modes == "0o6000o700"


def test_operator_admin_key_is_registered_and_no_file_written(server: RedisServer, tmp_path: Path) -> None:
    async def body(client: Any) -> None:
        keys = KeyStore(client)
        assert await keys.bootstrap("llmp_op_secret-from-a-k8s-secret", tmp_path) is None
        assert (await keys.authorize("llmp_op_secret-from-a-k8s-secret", "admin")).id == "op"
        assert await keys.bootstrap("llmp_op_secret-from-a-k8s-secret", tmp_path) is None
        assert len(await keys.list()) == 1

    run(server, body)
    assert not (tmp_path / "secrets").exists()


def test_request_quota_is_atomic_across_two_replicas(server: RedisServer) -> None:
    async def body(client: Any) -> tuple[int, list[float]]:
        other = redis.asyncio.Redis.from_url(server.url, decode_responses=True)  # a second gateway's client
        try:
            key = (await KeyStore(client).create("q", ["inference"], requests_per_minute=10)).record
            replicas = [Quotas(client, 600, 0), Quotas(other, 600, 0)]
            results = await asyncio.gather(*(replicas[i % 2].admit(key) for i in range(30)), return_exceptions=True)
        finally:
            await other.aclose()
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        return len(results) - len(refused), [r.retry_after for r in refused]

    admitted, waits = run(server, body)
    assert admitted == 10
    assert waits and all(1 <= w <= 6 for w in waits)  # one request refills in 6 s at 10/min


def test_token_quota_admits_until_spent_then_waits(server: RedisServer) -> None:
    async def body(client: Any) -> None:
        key = (await KeyStore(client).create("t", ["inference"], tokens_per_minute=100)).record
        quotas = Quotas(client, 0, 10_000)
        await quotas.admit(key)
        await quotas.charge(key, 250)  # a call ran over: the bucket is in debt
        error = await fails(quotas.admit(key), ResourceExhausted)
        assert "100 tokens per minute" in str(error) and error.retry_after >= 60  # type: ignore[attr-defined]
        unlimited = (await KeyStore(client).create("u", ["inference"], tokens_per_minute=0)).record
        await quotas.charge(unlimited, 10**9)
        await quotas.admit(unlimited)

    run(server, body)
