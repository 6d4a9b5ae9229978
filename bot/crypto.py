"""Envelope encryption: master keys → one data key per workspace → AES-GCM sealed values.

A sealed value is `version(1) | data-key id(8) | nonce(12) | ciphertext+tag`. The associated data binds the
header, the workspace and the value's purpose and name (`secret:DEPLOY_TOKEN`, `connection:github`), so a row
copied to another workspace or name fails to open, as does any changed byte. Master keys only ever wrap data
keys, so rotating a master key re-wraps one short row per workspace and leaves every value as it is.

Rotation without downtime: give every process the new key first (`RELAYBOT_MASTER_KEYS=new,old`), then run
`relaybot keys rotate`, which re-wraps one workspace per transaction (resumable, safe next to a running bot:
the data keys themselves never change, so the unwrapped copies the bot caches stay right). Once
`relaybot keys status` shows that the old key wraps nothing, drop it from the configuration.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import event, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot import audit
from bot.errors import ConfigError, DecryptionError
from bot.store.db import Database
from bot.store.models import DataKey

log = logging.getLogger(__name__)

VERSION = b"\x01"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 8
HEADER_BYTES = 1 + KEY_ID_BYTES
ENV_KEYS = "RELAYBOT_MASTER_KEYS"
ENV_KEY_FILE = "RELAYBOT_MASTER_KEY_FILE"


# ------------------------------------------------------------------------------------------------ purposes
# The purpose is part of every ciphertext's associated data: one per kind of stored value, and the name in it.


def secret_purpose(name: str) -> str:
    return f"secret:{name}"


def connection_purpose(integration: str) -> str:
    return f"connection:{integration}"


# ------------------------------------------------------------------------------------------------ master keys


@dataclass(frozen=True)
class MasterKey:
    id: str
    # Never in a repr: a MasterKey in a log line or a traceback must not print the key.
    key: bytes = field(repr=False)

    @classmethod
    def from_text(cls, text: str, *, source: str = ENV_KEYS) -> MasterKey:
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ConfigError(f"{source}: a key is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{source}: each key must be {KEY_BYTES} bytes, base64-encoded "
                              f"(`relaybot keys generate` prints one)")
        return cls(id=master_key_id(key), key=key)


def master_key_id(key: bytes) -> str:
    """A short public name for a key (a hash of it): stored with each data key it wraps."""
    return hashlib.sha256(b"relaybot-master-key-id:" + key).hexdigest()[:16]


def generate_master_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _write_new_key_file(path: Path) -> bool:
    """Create `path` holding a new key, mode 0600; False if another process created it first.

    The key is written to a private temporary file and hard-linked into place, so a process starting at the
    same moment sees either no file or a complete one, never a half-written key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write("# relaybot master key (newest first; one per line). Back it up.\n")
            handle.write(generate_master_key_text() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


def load_master_keys(*, keys: list[str], key_file: Path | None, default_file: Path,
                     generate: bool = True) -> list[MasterKey]:
    """Newest first, from RELAYBOT_MASTER_KEYS, else RELAYBOT_MASTER_KEY_FILE, else `default_file`.

    With no configuration and no `default_file` yet, a key is generated into it (0600), loudly — unless
    `generate` is False (the command-line tools: a new key there would make every stored value unreadable).
    """
    if keys:
        return [MasterKey.from_text(text) for text in keys]
    path = key_file or default_file
    source = ENV_KEY_FILE if key_file is not None else f"master key file {path}"
    if not path.exists():
        if key_file is not None:
            raise ConfigError(f"{ENV_KEY_FILE}: {path} does not exist")
        if not generate:
            raise ConfigError(f"no master key: set {ENV_KEYS} or {ENV_KEY_FILE} (or start the bot once, which "
                              f"generates {path})")
        if _write_new_key_file(path):
            log.warning("No master key configured: generated one into %s (mode 0600). Back it up; without it "
                        "the stored secrets cannot be read. Set %s or %s in production.", path, ENV_KEYS,
                        ENV_KEY_FILE)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("The master key file %s can be read by other users (mode %o); chmod 600 it.", path,
                        stat.S_IMODE(mode))
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # not readable by this user, a directory, not text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{source}: cannot read {path}: {reason}") from None
    lines = [line.strip() for line in text.splitlines()]
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise ConfigError(f"{source}: {path} holds no key")
    return [MasterKey.from_text(text, source=source) for text in texts]


# ------------------------------------------------------------------------------------------------ the keyring


def _aad(header: bytes, team_id: str, purpose: str) -> bytes:
    return header + b"\x00" + team_id.encode() + b"\x00" + purpose.encode()


def _wrap_aad(team_id: str, key_id: str, master_key_id: str) -> bytes:
    return f"relaybot-data-key\x00{team_id}\x00{key_id}\x00{master_key_id}".encode()


# session.info key: data keys created in a transaction that has not committed yet (see Keyring._data_key).
_CREATED_HERE = "relaybot.created_data_keys"


class Keyring:
    """Seals and opens values for workspaces. Data keys are cached unwrapped for the life of the process.

    The cache stays right across a rotation by another process: re-wrapping changes how a data key is stored,
    never the key itself. A data key is cached only once the row holding it is committed, so a rolled-back
    transaction cannot leave the process sealing values under a key that no other process can read.
    """

    def __init__(self, master_keys: list[MasterKey]) -> None:
        if not master_keys:
            raise ConfigError(f"{ENV_KEYS}: at least one master key is required")
        self.master_keys = master_keys
        self._by_id = {key.id: key for key in master_keys}
        self._data_keys: dict[str, tuple[str, bytes]] = {}

    @property
    def newest(self) -> MasterKey:
        return self.master_keys[0]

    def knows(self, master_key_id: str) -> bool:
        return master_key_id in self._by_id

    def _unwrap(self, row: DataKey) -> bytes:
        master = self._by_id.get(row.master_key_id)
        if master is None:
            raise DecryptionError(f"the data key of workspace {row.team_id} is wrapped by master key "
                                  f"{row.master_key_id}, which is not configured")
        blob = row.wrapped_key
        try:
            return AESGCM(master.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                              _wrap_aad(row.team_id, row.key_id, row.master_key_id))
        except InvalidTag:
            raise DecryptionError(f"the data key of workspace {row.team_id} failed authentication") from None

    def wrap(self, *, team_id: str, key_id: str, data_key: bytes, master: MasterKey) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(master.key).encrypt(nonce, data_key, _wrap_aad(team_id, key_id, master.id))

    async def _data_key(self, session: AsyncSession, team_id: str, *, create: bool) -> tuple[str, bytes] | None:
        created_here: dict[str, tuple[str, bytes]] = session.info.setdefault(_CREATED_HERE, {})
        if team_id in created_here:
            return created_here[team_id]
        cached = self._data_keys.get(team_id)
        if cached:
            return cached
        row = await session.get(DataKey, team_id, populate_existing=True)
        if row is None:
            if not create:
                return None
            return await self._create_data_key(session, team_id, created_here)
        entry = (row.key_id, self._unwrap(row))
        self._data_keys[team_id] = entry
        return entry

    async def _create_data_key(self, session: AsyncSession, team_id: str,
                               created_here: dict[str, tuple[str, bytes]]) -> tuple[str, bytes]:
        key_id = secrets.token_hex(KEY_ID_BYTES)
        data_key = AESGCM.generate_key(bit_length=256)
        values = {"team_id": team_id, "key_id": key_id, "master_key_id": self.newest.id,
                  "wrapped_key": self.wrap(team_id=team_id, key_id=key_id, data_key=data_key, master=self.newest),
                  "created_at": datetime.now(UTC), "rewrapped_at": None}
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        # Another process may create this workspace's key at the same moment: the first row wins, the other
        # process uses it.
        result = await session.execute(insert(DataKey).values(**values)
                                       .on_conflict_do_nothing(index_elements=["team_id"]))
        if not result.rowcount:  # type: ignore[attr-defined]
            row = await session.get(DataKey, team_id, populate_existing=True)
            assert row is not None
            entry = (row.key_id, self._unwrap(row))
            self._data_keys[team_id] = entry
            return entry
        entry = (key_id, data_key)
        created_here[team_id] = entry

        def committed(_session: object) -> None:
            self._data_keys.setdefault(team_id, entry)

        def rolled_back(_session: object) -> None:
            created_here.pop(team_id, None)

        event.listen(session.sync_session, "after_commit", committed, once=True)
        event.listen(session.sync_session, "after_rollback", rolled_back, once=True)
        return entry

    async def seal(self, session: AsyncSession, *, team_id: str, purpose: str, plaintext: bytes) -> bytes:
        """Encrypt for one workspace and one purpose; creates the workspace's data key on first use."""
        entry = await self._data_key(session, team_id, create=True)
        assert entry is not None
        key_id, data_key = entry
        header = VERSION + bytes.fromhex(key_id)
        nonce = secrets.token_bytes(NONCE_BYTES)
        return header + nonce + AESGCM(data_key).encrypt(nonce, plaintext, _aad(header, team_id, purpose))

    async def open(self, session: AsyncSession, *, team_id: str, purpose: str, sealed: bytes) -> bytes:
        """Decrypt, or raise DecryptionError: tampered, moved to another row, or the key is unknown."""
        if len(sealed) < HEADER_BYTES + NONCE_BYTES + TAG_BYTES or sealed[:1] != VERSION:
            raise DecryptionError(f"{purpose}: not a relaybot ciphertext")
        header = sealed[:HEADER_BYTES]
        entry = await self._data_key(session, team_id, create=False)
        if entry is not None and header[1:].hex() != entry[0] and team_id in self._data_keys:
            # The cached key may be out of date (the workspace's key was replaced by another process):
            # ask the database once before calling the ciphertext foreign.
            self.forget(team_id)
            entry = await self._data_key(session, team_id, create=False)
        if entry is None:
            raise DecryptionError(f"{purpose}: workspace {team_id} has no data key")
        key_id, data_key = entry
        if header[1:].hex() != key_id:
            raise DecryptionError(f"{purpose}: sealed under data key {header[1:].hex()}, "
                                  f"but workspace {team_id} uses {key_id}")
        nonce = sealed[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES]
        try:
            return AESGCM(data_key).decrypt(nonce, sealed[HEADER_BYTES + NONCE_BYTES:],
                                            _aad(header, team_id, purpose))
        except InvalidTag:
            raise DecryptionError(f"{purpose}: ciphertext failed authentication (tampered or moved)") from None

    async def seal_text(self, session: AsyncSession, *, team_id: str, purpose: str, text: str) -> bytes:
        return await self.seal(session, team_id=team_id, purpose=purpose, plaintext=text.encode())

    async def open_text(self, session: AsyncSession, *, team_id: str, purpose: str, sealed: bytes) -> str:
        try:
            return (await self.open(session, team_id=team_id, purpose=purpose, sealed=sealed)).decode()
        except UnicodeDecodeError:
            raise DecryptionError(f"{purpose}: the value is not text") from None

    def forget(self, team_id: str) -> None:
        self._data_keys.pop(team_id, None)

    async def rewrap(self, session: AsyncSession, team_id: str, *, now: datetime | None = None) -> bool:
        """Wrap one workspace's data key under the newest master key; False if it already was (or is gone).

        The caller's transaction holds the row (FOR UPDATE on PostgreSQL, the write lock on SQLite), so two
        rotations at once cannot interleave, and the data key inside stays the same.
        """
        row = (await session.execute(select(DataKey).where(DataKey.team_id == team_id).with_for_update()
                                     .execution_options(populate_existing=True))).scalar_one_or_none()
        if row is None or row.master_key_id == self.newest.id:
            return False
        data_key = self._unwrap(row)
        previous = row.master_key_id
        row.wrapped_key = self.wrap(team_id=team_id, key_id=row.key_id, data_key=data_key, master=self.newest)
        row.master_key_id = self.newest.id
        row.rewrapped_at = now or datetime.now(UTC)
        # Key ids only: they say which key wraps what, and reveal nothing of any key.
        await audit.append(session, team_id=team_id, actor=audit.Actor.system(), action="keys.rotated",
                           outcome="ok", details={"from_master_key": previous, "to_master_key": self.newest.id},
                           at=row.rewrapped_at)
        return True


# ------------------------------------------------------------------------------------------------ rotation


async def key_usage(session: AsyncSession) -> dict[str, int]:
    """master key id → number of workspace data keys wrapped by it."""
    rows = await session.execute(select(DataKey.master_key_id, func.count()).group_by(DataKey.master_key_id))
    return {master_key_id: count for master_key_id, count in rows.all()}


@dataclass
class Rotation:
    rewrapped: int = 0
    remaining: int = 0
    failed: dict[str, str] = field(default_factory=dict)


async def rotate_data_keys(db: Database, keyring: Keyring, *, limit: int | None = None, batch: int = 100
                           ) -> Rotation:
    """Re-wrap every data key not yet under the newest master key, one workspace per transaction.

    Interrupted at any point (killed, `limit` reached), every workspace is on either the old or the new key
    and readable with both configured; running it again finishes the job. A workspace whose key cannot be
    unwrapped (its master key is not configured) is reported and skipped.
    """
    rotation = Rotation()
    newest = keyring.newest.id
    after = ""
    while limit is None or rotation.rewrapped < limit:
        async with db.read() as session:
            team_ids = list((await session.execute(
                select(DataKey.team_id).where(DataKey.master_key_id != newest, DataKey.team_id > after)
                .order_by(DataKey.team_id).limit(batch))).scalars())
        if not team_ids:
            break
        for team_id in team_ids:
            after = team_id
            if limit is not None and rotation.rewrapped >= limit:
                break
            try:
                async with db.write() as session:
                    changed = await keyring.rewrap(session, team_id)
            except DecryptionError as exc:
                rotation.failed[team_id] = str(exc)
                continue
            if changed:
                rotation.rewrapped += 1
    async with db.read() as session:
        rotation.remaining = (await session.execute(
            select(func.count()).select_from(DataKey).where(DataKey.master_key_id != newest))).scalar_one()
    return rotation
