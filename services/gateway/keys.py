"""API keys: random, shown once, stored hashed in Redis, with scopes and an optional expiry.

A key reads `llmp_<id>_<secret>`: the id names it in listings and logs, the secret is 32 random
bytes. Only sha256(key) is stored (a key is high-entropy, so a plain hash cannot be reversed by
guessing), as the hash `llmp:gateway:key:<sha256>`; `llmp:gateway:key-ids` maps id -> sha256 so a
key can be listed and revoked by id. A revoked key stays listed, refused.

The first admin key: LLMP_GATEWAY_ADMIN_KEY when set (a Kubernetes Secret), else, when no admin key
exists, one is made and written to $LLMP_HOME/secrets/admin.key (folder 0700, file 0600, created
exclusively) for the `llmp` command line to read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

SCOPES = ("inference", "retrieval", "training", "tokenizer", "admin")
PREFIX = "llmp:gateway"
ADMIN_KEY_FILE = "secrets/admin.key"
_KEY = re.compile(r"^llmp_([A-Za-z0-9]{1,32})_.")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str:
    """The id part of a well-formed key, else ''."""
    match = _KEY.match(key)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float = 0.0
    """Unix seconds; 0: never."""
    revoked: bool = False
    requests_per_minute: int | None = None
    """None: the gateway's default."""
    tokens_per_minute: int | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def expired(self, now: float) -> bool:
        return bool(self.expires_at) and now >= self.expires_at

    def fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": ",".join(self.scopes),
            "created_at": repr(self.created_at),
            "expires_at": repr(self.expires_at),
            "revoked": "1" if self.revoked else "0",
            "rpm": "" if self.requests_per_minute is None else str(self.requests_per_minute),
            "tpm": "" if self.tokens_per_minute is None else str(self.tokens_per_minute),
        }

    @classmethod
    def of(cls, raw: dict[str, str]) -> KeyRecord:
        return cls(
            id=raw["id"],
            name=raw.get("name", ""),
            scopes=tuple(s for s in raw.get("scopes", "").split(",") if s),
            created_at=float(raw.get("created_at", 0)),
            expires_at=float(raw.get("expires_at", 0)),
            revoked=raw.get("revoked") == "1",
            requests_per_minute=int(raw["rpm"]) if raw.get("rpm") else None,
            tokens_per_minute=int(raw["tpm"]) if raw.get("tpm") else None,
        )


@dataclass(frozen=True)
class NewKey:
    key: str
    """The key itself: shown once, never stored."""
    record: KeyRecord


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    if not scopes:
        raise InvalidArgument(f"give at least one of {', '.join(SCOPES)}", field="scopes")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidArgument(f"unknown scope(s) {unknown}; expected {', '.join(SCOPES)}", field="scopes")
    return tuple(dict.fromkeys(scopes))


@dataclass
class KeyStore:
    """Keys in Redis (a redis.asyncio client built with decode_responses=True)."""

    redis: Any
    clock: Any = field(default=time.time)

    def _record_key(self, hashed: str) -> str:
        return f"{PREFIX}:key:{hashed}"

    async def create(
        self,
        name: str,
        scopes: Sequence[str],
        ttl_seconds: float = 0,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        key: str | None = None,
    ) -> NewKey:
        """A new key (or `key` given by the operator, e.g. from a Secret) with these scopes."""
        scopes = check_scopes(scopes)
        if ttl_seconds < 0:
            raise InvalidArgument("must be >= 0 (0: never expires)", field="ttl_seconds")
        for value, name_ in ((requests_per_minute, "requests_per_minute"), (tokens_per_minute, "tokens_per_minute")):
            if value is not None and value < 0:
                raise InvalidArgument("must be >= 0 (0: unlimited)", field=name_)
        if key is None:
            key = f"llmp_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
        kid = key_id_of(key) or digest(key)[:12]
        now = self.clock()
        record = KeyRecord(
            kid,
            name,
            scopes,
            now,
            now + ttl_seconds if ttl_seconds else 0.0,
            False,
            requests_per_minute,
            tokens_per_minute,
        )
        hashed = digest(key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._record_key(hashed), mapping=record.fields())
        pipe.hset(f"{PREFIX}:key-ids", kid, hashed)
        await pipe.execute()
        log.info("API key %s (%s) created with scopes %s", kid, name, ",".join(scopes))
        return NewKey(key, record)

    async def verify(self, key: str) -> KeyRecord:
        """The key's record; UNAUTHENTICATED when it is missing, unknown, revoked or expired."""
        if not key:
            raise Unauthenticated("no API key: send 'Authorization: Bearer <key>'")
        raw = await self.redis.hgetall(self._record_key(digest(key)))
        if not raw:
            raise Unauthenticated("invalid API key")
        record = KeyRecord.of(raw)
        if record.revoked:
            raise Unauthenticated(f"API key {record.id} was revoked")
        if record.expired(self.clock()):
            raise Unauthenticated(f"API key {record.id} has expired")
        return record

    async def authorize(self, key: str, scope: str) -> KeyRecord:
        record = await self.verify(key)
        if not record.allows(scope):
            raise PermissionDenied(f"API key {record.id} lacks the {scope!r} scope (it has {','.join(record.scopes)})")
        return record

    async def list(self) -> list[KeyRecord]:
        ids: dict[str, str] = await self.redis.hgetall(f"{PREFIX}:key-ids")
        records = []
        for hashed in ids.values():
            raw = await self.redis.hgetall(self._record_key(hashed))
            if raw:
                records.append(KeyRecord.of(raw))
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> KeyRecord:
        hashed = await self.redis.hget(f"{PREFIX}:key-ids", key_id)
        if not hashed:
            raise NotFound(f"no API key {key_id!r}", field="id")
        await self.redis.hset(self._record_key(hashed), "revoked", "1")
        log.info("API key %s revoked", key_id)
        return KeyRecord.of(await self.redis.hgetall(self._record_key(hashed)))

    async def has_admin(self) -> bool:
        now = self.clock()
        return any(r.allows("admin") and not r.revoked and not r.expired(now) for r in await self.list())

    async def bootstrap(self, admin_key: str, home: Path) -> Path | None:
        """Register the operator's admin key, or make the first one; returns the file it was written to."""
        if admin_key:
            if not await self.redis.exists(self._record_key(digest(admin_key))):
                await self.create("admin (LLMP_GATEWAY_ADMIN_KEY)", ["admin"], key=admin_key)
            return None
        path = home / ADMIN_KEY_FILE
        if path.exists():  # ours from an earlier start; Redis may have been emptied since
            key = path.read_text().strip()
            if key and not await self.redis.exists(self._record_key(digest(key))):
                await self.create("admin (first start)", ["admin"], key=key)
            return path
        # One gateway replica makes the key; the others see it (the lock lives a minute at most).
        if await self.has_admin() or not await self.redis.set(f"{PREFIX}:bootstrap", "1", nx=True, ex=60):
            return None
        new = await self.create("admin (first start)", ["admin"])
        write_secret(path, new.key)
        log.warning("first admin API key written to %s (mode 0600); `llmp keys` uses it", path)
        return path


def write_secret(path: Path, value: str) -> None:
    """Write a new file readable by its owner only, in a folder only its owner can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
