"""OAuth installations: slack-sdk's SQLAlchemy store on our database, with tokens sealed by the keyring.

Finds are cached for a minute (Bolt looks the installation up on every request; a click should not cost a
query), saves and deletes clear the cache. Installing (or reinstalling) a workspace marks it installed, which
brings back its connections and subscriptions exactly as they were.
"""

from __future__ import annotations

import base64
import copy
import logging
import time
from datetime import UTC, datetime
from typing import Any

from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.oauth.installation_store.models.installation import Installation
from slack_sdk.oauth.installation_store.sqlalchemy import AsyncSQLAlchemyInstallationStore

from bot import audit
from bot.audit import Actor
from bot.crypto import Keyring
from bot.store.db import Database
from bot.store.models import Workspace

log = logging.getLogger(__name__)
SEALED = "rbenc1:"
TOKEN_FIELDS = ("bot_token", "bot_refresh_token", "user_token", "user_refresh_token")
CACHE_SECONDS = 60.0


class EncryptedInstallationStore(AsyncInstallationStore):
    def __init__(self, *, db: Database, keyring: Keyring, client_id: str) -> None:
        self.db = db
        self.keyring = keyring
        self._reads = AsyncSQLAlchemyInstallationStore(client_id=client_id, engine=db.read_engine)
        self._writes = AsyncSQLAlchemyInstallationStore(client_id=client_id, engine=db.engine)
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}

    @property
    def logger(self) -> logging.Logger:
        return log

    # ------------------------------------------------------------------------------------------ sealing

    async def _seal(self, team_id: str, field: str, value: str | None) -> str | None:
        if not value or value.startswith(SEALED):
            return value
        async with self.db.write() as session:
            sealed = await self.keyring.seal(session, team_id=team_id, purpose=f"oauth:{field}",
                                             plaintext=value.encode())
        return SEALED + base64.b64encode(sealed).decode()

    async def _open(self, team_id: str, field: str, value: str | None) -> str | None:
        if not value or not value.startswith(SEALED):
            return value
        async with self.db.read() as session:
            plain = await self.keyring.open(session, team_id=team_id, purpose=f"oauth:{field}",
                                            sealed=base64.b64decode(value[len(SEALED):]))
        return plain.decode()

    async def _sealed_copy(self, entity: Any) -> Any:
        sealed = copy.copy(entity)
        team = entity.team_id or entity.enterprise_id or "-"
        for field in TOKEN_FIELDS:
            if hasattr(sealed, field):
                setattr(sealed, field, await self._seal(team, field, getattr(sealed, field)))
        return sealed

    async def _opened(self, entity: Any) -> Any:
        if entity is None:
            return None
        team = entity.team_id or entity.enterprise_id or "-"
        for field in TOKEN_FIELDS:
            if hasattr(entity, field):
                setattr(entity, field, await self._open(team, field, getattr(entity, field)))
        return entity

    # ------------------------------------------------------------------------------------------ cache

    def _cached(self, key: tuple[Any, ...]) -> tuple[bool, Any]:
        entry = self._cache.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, copy.copy(entry[1])

    def _remember(self, key: tuple[Any, ...], value: Any) -> None:
        self._cache[key] = (time.monotonic() + CACHE_SECONDS, copy.copy(value))

    def forget(self, team_id: str | None = None) -> None:
        if team_id is None:
            self._cache.clear()
            return
        for key in [key for key in self._cache if team_id in key]:
            del self._cache[key]

    # ------------------------------------------------------------------------------------------ the store

    async def async_save(self, installation: Installation) -> None:
        await self._writes.async_save(await self._sealed_copy(installation))
        self.forget(installation.team_id)
        if installation.team_id:
            await self._installed(installation.team_id, installation.team_name, installation.user_id)

    async def async_save_bot(self, bot: Bot) -> None:
        await self._writes.async_save_bot(await self._sealed_copy(bot))
        self.forget(bot.team_id)

    async def async_find_bot(self, *, enterprise_id: str | None, team_id: str | None,
                             is_enterprise_install: bool | None = False) -> Bot | None:
        key = ("bot", enterprise_id, team_id, bool(is_enterprise_install))
        hit, value = self._cached(key)
        if hit:
            return value  # type: ignore[no-any-return]
        bot = await self._opened(await self._reads.async_find_bot(
            enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=is_enterprise_install))
        self._remember(key, bot)
        return bot  # type: ignore[no-any-return]

    async def async_find_installation(self, *, enterprise_id: str | None, team_id: str | None,
                                      user_id: str | None = None, is_enterprise_install: bool | None = False
                                      ) -> Installation | None:
        key = ("installation", enterprise_id, team_id, user_id, bool(is_enterprise_install))
        hit, value = self._cached(key)
        if hit:
            return value  # type: ignore[no-any-return]
        installation = await self._opened(await self._reads.async_find_installation(
            enterprise_id=enterprise_id, team_id=team_id, user_id=user_id,
            is_enterprise_install=is_enterprise_install))
        self._remember(key, installation)
        return installation  # type: ignore[no-any-return]

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await self._writes.async_delete_bot(enterprise_id=enterprise_id, team_id=team_id)
        self.forget(team_id)

    async def async_delete_installation(self, *, enterprise_id: str | None, team_id: str | None,
                                        user_id: str | None = None) -> None:
        await self._writes.async_delete_installation(enterprise_id=enterprise_id, team_id=team_id, user_id=user_id)
        self.forget(team_id)

    async def async_delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await self.async_delete_bot(enterprise_id=enterprise_id, team_id=team_id)
        await self.async_delete_installation(enterprise_id=enterprise_id, team_id=team_id)

    async def _installed(self, team_id: str, name: str | None, user_id: str | None) -> None:
        now = datetime.now(UTC)
        async with self.db.write() as session:
            workspace = await session.get(Workspace, team_id)
            reinstalled = workspace is not None
            if workspace is None:
                session.add(Workspace(team_id=team_id, name=name, installed_at=now, uninstalled_at=None))
            else:
                workspace.uninstalled_at = None
                workspace.installed_at = now
                workspace.name = name or workspace.name
            await audit.append(session, team_id=team_id, actor=Actor(user_id or "system"),
                               action="app.reinstalled" if reinstalled else "app.installed", outcome="ok", at=now)


class InstallationTokens:
    """The bot token of a workspace, from its installation (none once uninstalled)."""

    def __init__(self, store: EncryptedInstallationStore) -> None:
        self.store = store

    async def bot_token(self, team_id: str) -> str | None:
        bot = await self.store.async_find_bot(enterprise_id=None, team_id=team_id)
        return bot.bot_token if bot is not None else None
