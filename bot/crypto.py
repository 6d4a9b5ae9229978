"""Envelope encryption: master keys → one data key per workspace → AES-GCM sealed values.

A sealed value is `version(1) | data-key id(8) | nonce(12) | ciphertext+tag`. The associated data binds the
header, the workspace and the value's purpose and name (`secret:DEPLOY_TOKEN`, `connection:github`), so a row
copied to another workspace or name fails to open, as does any changed byte. Master keys only ever wrap data
keys, so rotating a master key re-wraps one short row per workspace and leaves every value as it is.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.errors import ConfigError, DecryptionError
from bot.store.models import DataKey

log = logging.getLogger(__name__)

VERSION = b"\x01"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_BYTES = 8
HEADER_BYTES = 1 + KEY_ID_BYTES


@dataclass(frozen=True)
class MasterKey:
    id: str
    key: bytes

    @classmethod
    def from_text(cls, text: str) -> MasterKey:
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise ConfigError("RELAYBOT_MASTER_KEYS: a key is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigError(f"RELAYBOT_MASTER_KEYS: each key must be {KEY_BYTES} bytes, base64-encoded "
                              f"(`relaybot keys generate` prints one)")
        return cls(id=hashlib.sha256(b"relaybot-master-key-id:" + key).hexdigest()[:16], key=key)


def generate_master_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def load_master_keys(*, keys: list[str], key_file: Path | None, default_file: Path) -> list[MasterKey]:
    """Newest first. With no configuration at all, a key is generated into `default_file` (0600), loudly."""
    if keys:
        return [MasterKey.from_text(text) for text in keys]
    path = key_file or default_file
    if not path.exists():
        if key_file is not None:
            raise ConfigError(f"RELAYBOT_MASTER_KEY_FILE: {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(generate_master_key_text() + "\n")
        log.warning("No master key configured: generated one into %s (mode 0600). Back it up; without it "
                    "the stored secrets cannot be read. Set RELAYBOT_MASTER_KEYS or RELAYBOT_MASTER_KEY_FILE "
                    "in production.", path)
    lines = [line.strip() for line in path.read_text().splitlines()]
    texts = [line for line in lines if line and not line.startswith("#")]
    if not texts:
        raise ConfigError(f"RELAYBOT_MASTER_KEY_FILE: {path} holds no key")
    return [MasterKey.from_text(text) for text in texts]


def _aad(header: bytes, team_id: str, purpose: str) -> bytes:
    return header + b"\x00" + team_id.encode() + b"\x00" + purpose.encode()


def _wrap_aad(team_id: str, key_id: str, master_key_id: str) -> bytes:
    return f"relaybot-data-key\x00{team_id}\x00{key_id}\x00{master_key_id}".encode()


class Keyring:
    """Seals and opens values for workspaces. Data keys are cached unwrapped for the life of the process."""

    def __init__(self, master_keys: list[MasterKey]) -> None:
        if not master_keys:
            raise ConfigError("RELAYBOT_MASTER_KEYS: at least one master key is required")
        self.master_keys = master_keys
        self._by_id = {key.id: key for key in master_keys}
        self._data_keys: dict[str, tuple[str, bytes]] = {}

    @property
    def newest(self) -> MasterKey:
        return self.master_keys[0]

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
        cached = self._data_keys.get(team_id)
        if cached:
            return cached
        row = await session.get(DataKey, team_id)
        if row is None:
            if not create:
                return None
            key_id = secrets.token_hex(KEY_ID_BYTES)
            data_key = AESGCM.generate_key(bit_length=256)
            row = DataKey(team_id=team_id, key_id=key_id, master_key_id=self.newest.id,
                          wrapped_key=self.wrap(team_id=team_id, key_id=key_id, data_key=data_key,
                                                master=self.newest),
                          created_at=datetime.now(UTC), rewrapped_at=None)
            session.add(row)
            await session.flush()
            self._data_keys[team_id] = (key_id, data_key)
            return key_id, data_key
        entry = (row.key_id, self._unwrap(row))
        self._data_keys[team_id] = entry
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
        if len(sealed) < HEADER_BYTES + NONCE_BYTES + 16 or sealed[:1] != VERSION:
            raise DecryptionError(f"{purpose}: not a relaybot ciphertext")
        entry = await self._data_key(session, team_id, create=False)
        if entry is None:
            raise DecryptionError(f"{purpose}: workspace {team_id} has no data key")
        key_id, data_key = entry
        header = sealed[:HEADER_BYTES]
        if header[1:].hex() != key_id:
            raise DecryptionError(f"{purpose}: sealed under data key {header[1:].hex()}, "
                                  f"but workspace {team_id} uses {key_id}")
        nonce = sealed[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES]
        try:
            return AESGCM(data_key).decrypt(nonce, sealed[HEADER_BYTES + NONCE_BYTES:],
                                            _aad(header, team_id, purpose))
        except InvalidTag:
            raise DecryptionError(f"{purpose}: ciphertext failed authentication (tampered or moved)") from None

    def forget(self, team_id: str) -> None:
        self._data_keys.pop(team_id, None)


async def key_usage(session: AsyncSession) -> dict[str, int]:
    """master key id → number of workspace data keys wrapped by it."""
    rows = await session.execute(select(DataKey.master_key_id, func.count()).group_by(DataKey.master_key_id))
    return {master_key_id: count for master_key_id, count in rows.all()}
