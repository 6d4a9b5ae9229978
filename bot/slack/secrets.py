"""Secrets from Slack: `/relay secret set|list|delete` and `/relay connect <integration> set-secret`.

A value is only ever typed into a modal. `set` opens it (views.open with the command's trigger_id); the
view_submission is checked before it is acknowledged, so a bad name, an empty value or one over 64 KiB comes
back as an inline error in the still-open modal; a good one closes the modal, is sealed into the database and
confirmed by an ephemeral note in the channel where the command was typed (carried in the view's
private_metadata). The value never goes into a message, a log line or an audit record: only its name does.

The storage functions at the top do not depend on Slack; `relaybot secrets` uses them too.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import InputBlock, MarkdownTextObject, PlainTextInputElement, SectionBlock
from slack_sdk.models.views import View
from sqlalchemy import delete, select

from bot import audit
from bot.audit import Actor
from bot.crypto import Keyring, connection_purpose, secret_purpose
from bot.errors import NotAllowed, NotFound, UserError, reference_id
from bot.ids import new_connection_id
from bot.masking import MIN_LENGTH
from bot.services import Services
from bot.slack import messages
from bot.store.db import Database
from bot.store.models import Connection, Secret
from integrations.registry import INTEGRATIONS

if TYPE_CHECKING:
    from bot.slack.commands import Command

log = logging.getLogger(__name__)

SECRET_FORM = "relaybot_secret_set"
CONNECTION_SECRET_FORM = "relaybot_connection_secret_set"
NAME_BLOCK, NAME_INPUT = "secret_name", "name"
VALUE_BLOCK, VALUE_INPUT = "secret_value", "value"
MAX_VALUE_BYTES = 64 * 1024
MAX_NAME_LENGTH = 100  # the width of secrets.name
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Credentials that are also valid names (GitHub, Stripe, AWS key ids): a value typed where the name goes.
_CREDENTIAL = re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|[sr]k_(?:live|test)_\w{10,}|AKIA[0-9A-Z]{16}")


# ---------------------------------------------------------------------------------------------- storage


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a secret (it must work as `secrets.NAME` in an expression), or None."""
    if _CREDENTIAL.fullmatch(name):
        return messages.SECRET_NAME_IS_A_CREDENTIAL  # not repeated back: it is the value, typed in the open
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        return messages.SECRET_BAD_NAME.format(name=messages.escape(name[:MAX_NAME_LENGTH]), limit=MAX_NAME_LENGTH)
    return None


def value_problem(value: str) -> str | None:
    if not value.strip():
        return messages.SECRET_VALUE_EMPTY
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        return messages.SECRET_VALUE_NOT_TEXT
    if size > MAX_VALUE_BYTES:
        return messages.SECRET_VALUE_TOO_LARGE.format(size=size, limit=MAX_VALUE_BYTES)
    return None


async def store_secret(db: Database, keyring: Keyring, *, team_id: str, name: str, value: str,
                       actor: Actor) -> bool:
    """Seal and store (or replace) one secret, with its audit record; True if it replaced a value."""
    now = datetime.now(UTC)
    async with db.write() as session:
        sealed = await keyring.seal(session, team_id=team_id, purpose=secret_purpose(name), plaintext=value.encode())
        row = await session.get(Secret, (team_id, name))
        replaced = row is not None
        if row is None:
            session.add(Secret(team_id=team_id, name=name, ciphertext=sealed, set_by=actor.id,
                               set_by_name=actor.name, set_at=now))
        else:
            row.ciphertext, row.set_by, row.set_by_name, row.set_at = sealed, actor.id, actor.name, now
        await audit.append(session, team_id=team_id, actor=actor, action="secret.set", outcome="ok",
                           details={"name": name, "replaced": replaced}, at=now)
    return replaced


async def delete_secret(db: Database, *, team_id: str, name: str, actor: Actor) -> bool:
    """Delete one secret, with its audit record; False if there was none."""
    async with db.write() as session:
        result = await session.execute(delete(Secret).where(Secret.team_id == team_id, Secret.name == name))
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        await audit.append(session, team_id=team_id, actor=actor, action="secret.deleted", outcome="ok",
                           details={"name": name})
    return True


async def list_secrets(db: Database, *, team_id: str) -> list[Secret]:
    async with db.read() as session:
        return list((await session.execute(select(Secret).where(Secret.team_id == team_id)
                                           .order_by(Secret.name))).scalars())


async def store_connection_secret(db: Database, keyring: Keyring, *, team_id: str, integration: str, value: str,
                                  actor: Actor) -> tuple[str, bool]:
    """Store a signing secret a tool generated for the workspace's connection (creating the connection if
    there is none yet); returns the connection id and whether it was created."""
    now = datetime.now(UTC)
    async with db.write() as session:
        connection = (await session.execute(select(Connection).where(
            Connection.team_id == team_id, Connection.integration == integration))).scalar_one_or_none()
        created = connection is None
        sealed = await keyring.seal(session, team_id=team_id, purpose=connection_purpose(integration),
                                    plaintext=value.encode())
        if connection is None:
            connection = Connection(id=new_connection_id(), team_id=team_id, integration=integration,
                                    secret_ciphertext=sealed, created_by=actor.id, created_at=now, rotated_at=None)
            session.add(connection)
        else:
            connection.secret_ciphertext = sealed
            connection.rotated_at = now
        await audit.append(session, team_id=team_id, actor=actor, action="connection.secret_set", outcome="ok",
                           details={"integration": integration, "connection": connection.id, "created": created},
                           at=now)
    return connection.id, created


# ---------------------------------------------------------------------------------------------- commands


async def _require_admin(services: Services, team_id: str, user_id: str, what: str) -> None:
    if not await services.people.is_admin(team_id, user_id):
        raise NotAllowed(messages.NOT_ADMIN.format(what=what))


def _text_input(*, block_id: str, action_id: str, label: str, hint: str, initial: str | None = None,
                multiline: bool = False, max_length: int | None = None) -> InputBlock:
    return InputBlock(block_id=block_id, label=label, hint=hint,
                      element=PlainTextInputElement(action_id=action_id, initial_value=initial or None,
                                                    multiline=multiline, max_length=max_length))


def secret_form(*, name: str, channel_id: str) -> dict[str, Any]:
    view = View(type="modal", callback_id=SECRET_FORM, title=messages.SECRET_FORM_TITLE,
                submit=messages.FORM_SUBMIT, close=messages.FORM_CLOSE,
                private_metadata=json.dumps({"channel": channel_id}),
                blocks=[SectionBlock(text=MarkdownTextObject(text=messages.SECRET_FORM_INTRO)),
                        _text_input(block_id=NAME_BLOCK, action_id=NAME_INPUT, label=messages.SECRET_NAME_LABEL,
                                    hint=messages.SECRET_NAME_HINT, initial=name, max_length=MAX_NAME_LENGTH),
                        _text_input(block_id=VALUE_BLOCK, action_id=VALUE_INPUT, label=messages.SECRET_VALUE_LABEL,
                                    hint=messages.SECRET_VALUE_HINT, multiline=True)])
    return view.to_dict()


def connection_secret_form(*, integration: str, channel_id: str) -> dict[str, Any]:
    view = View(type="modal", callback_id=CONNECTION_SECRET_FORM, title=messages.CONNECTION_FORM_TITLE,
                submit=messages.FORM_SUBMIT, close=messages.FORM_CLOSE,
                private_metadata=json.dumps({"channel": channel_id, "integration": integration}),
                blocks=[SectionBlock(text=MarkdownTextObject(
                            text=messages.CONNECTION_FORM_INTRO.format(integration=integration))),
                        _text_input(block_id=VALUE_BLOCK, action_id=VALUE_INPUT,
                                    label=messages.CONNECTION_VALUE_LABEL, hint=messages.CONNECTION_VALUE_HINT)])
    return view.to_dict()


async def _open_form(services: Services, command: Command, view: dict[str, Any]) -> str:
    if not command.trigger_id:
        raise UserError(messages.SECRET_NO_TRIGGER)
    try:
        await services.slack.call(command.team_id, "views.open", trigger_id=command.trigger_id, view=view)
    except SlackApiError as exc:
        raise UserError(messages.SECRET_FORM_FAILED.format(error=exc.response.get("error", "error"))) from None
    return ""  # the form is the answer; no ephemeral message


async def cmd_secret(services: Services, command: Command, words: list[str]) -> str:
    """`/relay secret set <NAME>` · `/relay secret list` · `/relay secret delete <NAME>` (admins)."""
    sub = words[0].lower() if words else ""
    if sub not in ("set", "list", "delete"):
        usage = messages.SECRET_USAGE.format(command=command.name)
        if not sub:
            return usage
        raise UserError(usage)
    name = words[1] if len(words) > 1 else ""
    if sub == "set":
        # Checked before anything else, the admin check included: whoever typed a value must hear it is exposed.
        # A name that is not one (`FOO=value`, a pasted token) is not repeated back either.
        if len(words) > 2 or (name and name_problem(name)):
            raise UserError(messages.SECRET_VALUE_IN_COMMAND.format(command=command.name, limit=MAX_NAME_LENGTH))
        await _require_admin(services, command.team_id, command.user_id, messages.SECRET_MANAGE)
        return await _open_form(services, command, secret_form(name=name, channel_id=command.channel_id))
    await _require_admin(services, command.team_id, command.user_id, messages.SECRET_MANAGE)
    if len(words) > (1 if sub == "list" else 2):
        raise UserError(messages.SECRET_USAGE.format(command=command.name))
    if sub == "list":
        rows = await list_secrets(services.db, team_id=command.team_id)
        if not rows:
            return messages.SECRET_NONE.format(command=command.name)
        return messages.secret_list([messages.secret_line(name=row.name, set_by=row.set_by,
                                                          set_by_name=row.set_by_name, set_at=row.set_at)
                                     for row in rows])
    if not name:
        raise UserError(messages.SECRET_NEED_NAME.format(command=command.name, sub=sub))
    if not await delete_secret(services.db, team_id=command.team_id, name=name, actor=command.actor):
        raise NotFound(messages.SECRET_NOT_FOUND.format(name=messages.escape(name), command=command.name))
    return messages.SECRET_DELETED.format(name=messages.escape(name))


async def open_connection_secret_form(services: Services, command: Command, integration: str) -> str:
    """`/relay connect <integration> set-secret` (the caller has checked its words, and that the user is an
    admin)."""
    if not INTEGRATIONS[integration].receives_webhooks:
        raise UserError(messages.CONNECTION_NO_WEBHOOKS.format(name=integration))
    return await _open_form(services, command, connection_secret_form(integration=integration,
                                                                      channel_id=command.channel_id))


# ---------------------------------------------------------------------------------------------- submissions


def _submitted(view: dict[str, Any], block_id: str, action_id: str) -> str:
    state = ((view.get("state") or {}).get("values") or {}).get(block_id) or {}
    return str((state.get(action_id) or {}).get("value") or "")


def _metadata(view: dict[str, Any]) -> dict[str, Any]:
    try:
        data = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _submitter(body: dict[str, Any]) -> tuple[str, Actor]:
    person = body.get("user") or {}
    team_id = (body.get("team") or {}).get("id") or person.get("team_id") or ""
    return team_id, Actor(person.get("id", ""), person.get("username") or person.get("name"))


async def _tell(services: Services, team_id: str, channel: str | None, user_id: str, text: str) -> None:
    """An ephemeral note where the command was typed; where relaybot cannot post (a direct message, a channel it
    is not in), a direct message from relaybot instead, so that the outcome is never silent. The modal is
    already closed: only a failure of both is left to the log."""
    if channel:
        try:
            await services.slack.call(team_id, "chat.postEphemeral", channel=channel, user=user_id, text=text)
            return
        except Exception as exc:
            log.info("could not confirm a secret form to %s in %s (%s); sending a direct message", user_id,
                     channel, type(exc).__name__)
    try:
        await services.slack.call(team_id, "chat.postMessage", channel=user_id, text=text)
    except Exception as exc:
        log.warning("could not confirm a secret form to %s in workspace %s: %s", user_id, team_id,
                    type(exc).__name__)


class _Forms:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def _refusal(self, team_id: str, actor: Actor) -> str | None:
        if await self.services.people.is_admin(team_id, actor.id):
            return None
        return messages.SECRET_SUBMIT_NOT_ADMIN

    async def on_secret(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        team_id, actor = _submitter(body)
        name = _submitted(view, NAME_BLOCK, NAME_INPUT).strip()
        value = _submitted(view, VALUE_BLOCK, VALUE_INPUT)
        errors = {block: problem for block, problem in ((NAME_BLOCK, name_problem(name)),
                                                        (VALUE_BLOCK, value_problem(value))) if problem}
        if not errors and (refusal := await self._refusal(team_id, actor)):
            errors[VALUE_BLOCK] = refusal
        if errors:
            await ack(response_action="errors", errors=errors)
            return
        await ack()
        # From here on the value is a secret of this process: keep it out of any log line.
        await self.services.log_masker.masker_for([value])
        channel = _metadata(view).get("channel")
        try:
            replaced = await store_secret(self.services.db, self.services.keyring, team_id=team_id, name=name,
                                          value=value, actor=actor)
        except Exception:
            ref = reference_id()
            log.exception("storing secret %s of workspace %s failed [ref %s]", name, team_id, ref)
            await _tell(self.services, team_id, channel, actor.id, messages.SECRET_STORE_FAILED.format(ref=ref))
            return
        await _tell(self.services, team_id, channel, actor.id,
                    messages.secret_stored(name=name, replaced=replaced, maskable=len(value) >= MIN_LENGTH))

    async def on_connection_secret(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        team_id, actor = _submitter(body)
        metadata = _metadata(view)
        integration = str(metadata.get("integration") or "")
        value = _submitted(view, VALUE_BLOCK, VALUE_INPUT).strip()
        problem = value_problem(value)
        integration_class = INTEGRATIONS.get(integration)
        if problem is None and (integration_class is None or not integration_class.receives_webhooks):
            problem = messages.CONNECTION_NO_WEBHOOKS.format(name=messages.escape(integration))
        if problem is None:
            problem = await self._refusal(team_id, actor)
        if problem:
            await ack(response_action="errors", errors={VALUE_BLOCK: problem})
            return
        await ack()
        await self.services.log_masker.masker_for([value])
        channel = metadata.get("channel")
        try:
            connection_id, created = await store_connection_secret(
                self.services.db, self.services.keyring, team_id=team_id, integration=integration, value=value,
                actor=actor)
        except Exception:
            ref = reference_id()
            log.exception("storing the %s connection secret of workspace %s failed [ref %s]", integration,
                          team_id, ref)
            await _tell(self.services, team_id, channel, actor.id, messages.SECRET_STORE_FAILED.format(ref=ref))
            return
        self.services.forget_connection(connection_id)
        url = f"{self.services.settings.public_url}/hooks/{connection_id}"
        await _tell(self.services, team_id, channel, actor.id,
                    messages.connection_secret_stored(integration=integration, url=url, created=created))


def register(app: AsyncApp, services: Services) -> None:
    forms = _Forms(services)
    app.view(SECRET_FORM)(forms.on_secret)
    app.view(CONNECTION_SECRET_FORM)(forms.on_connection_secret)
