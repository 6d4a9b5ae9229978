"""The tables. Every row belongs to one workspace (`team_id`), except the content-addressed workflow versions.

State machines live in `bot.engine`; these classes only say what is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from slack_sdk.oauth.state_store.sqlalchemy import SQLAlchemyOAuthStateStore
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC datetimes")
        value = value.astimezone(UTC)
        # SQLite compares datetimes as text: one format without an offset keeps the order right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A 64-bit primary key on PostgreSQL, and SQLite's rowid alias (which must be exactly INTEGER) there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Workspace(Base):
    __tablename__ = "workspaces"
    team_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    installed_at: Mapped[datetime]
    uninstalled_at: Mapped[datetime | None]


class DataKey(Base):
    """A workspace's data key, wrapped (AES-GCM) by one master key."""

    __tablename__ = "data_keys"
    team_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    master_key_id: Mapped[str] = mapped_column(String(32))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    rewrapped_at: Mapped[datetime | None]


class Connection(Base):
    """An inbound endpoint: `/hooks/<id>` for one integration of one workspace."""

    __tablename__ = "connections"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(32), index=True)
    integration: Mapped[str] = mapped_column(String(40))
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    rotated_at: Mapped[datetime | None]
    __table_args__ = (UniqueConstraint("team_id", "integration"),)


class Subscription(Base):
    """A workflow enabled in one channel of one workspace."""

    __tablename__ = "subscriptions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(String(32))
    channel_id: Mapped[str] = mapped_column(String(32))
    workflow: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]]
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    __table_args__ = (
        UniqueConstraint("team_id", "channel_id", "workflow"),
        Index("ix_subscriptions_team_workflow", "team_id", "workflow"),
    )


class Event(Base):
    """The inbox: every accepted webhook, command, poll find or schedule tick, stored before it is answered."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(40))
    delivery_id: Mapped[str] = mapped_column(String(200))
    connection_id: Mapped[str | None] = mapped_column(String(64))
    # Set when the event targets one subscription (a `/relay run`, a poll, a schedule tick).
    subscription_id: Mapped[int | None] = mapped_column(BigId)
    kind: Mapped[str] = mapped_column(String(200))
    # What a trigger's `events:` filter compares (X-GitHub-Event, object_kind, event_type ...).
    event_name: Mapped[str | None] = mapped_column(String(200))
    # False for events that only test a connection (GitHub's ping): they start only runs that name them.
    actionable: Mapped[bool] = mapped_column(default=True)
    # A `/relay run` names its workflow and channel; other events go to every matching subscription.
    target_workflow: Mapped[str | None] = mapped_column(String(100))
    target_channel: Mapped[str | None] = mapped_column(String(32))
    summary: Mapped[str] = mapped_column(Text, default="")
    link: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSON)
    headers: Mapped[dict[str, Any]]
    source_addr: Mapped[str | None] = mapped_column(String(64))
    started_by: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime]
    processed_at: Mapped[datetime | None]
    # Set when retention removed the payload (RELAYBOT_RETENTION_DAYS); the row stays for deduplication.
    pruned_at: Mapped[datetime | None]
    # Why the intake set the event aside (it failed on its own, see `Intake`); None for every other event.
    intake_error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (
        UniqueConstraint("team_id", "source", "delivery_id"),
        # Only events still waiting to become runs, in id order: the intake's `ORDER BY id LIMIT n` walks it and
        # stops, however many events are stored or pending. A full (processed_at, id) index led PostgreSQL to
        # read and sort every pending event for each batch during a burst.
        Index("ix_events_pending", "id", postgresql_where=text("processed_at IS NULL"),
              sqlite_where=text("processed_at IS NULL")),
    )


class WorkflowVersion(Base):
    """The exact workflow text a run started with, so a run finishes as it began even if the file changes."""

    __tablename__ = "workflow_versions"
    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


_WAKES = text("wake_at IS NOT NULL")
_POOLED = text("concurrency_key IS NOT NULL")
_UNFINISHED = text("finished_at IS NULL")
_PENDING = text("state = 'pending'")


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(32))
    subscription_id: Mapped[int | None] = mapped_column(BigId)
    event_id: Mapped[int] = mapped_column(BigId, ForeignKey("events.id"))
    workflow: Mapped[str] = mapped_column(String(100))
    workflow_hash: Mapped[str] = mapped_column(String(64), ForeignKey("workflow_versions.hash"))
    channel_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(Text, default="")
    context: Mapped[dict[str, Any]]
    card: Mapped[dict[str, Any]]
    started_by: Mapped[str | None] = mapped_column(String(64))
    started_by_name: Mapped[str | None] = mapped_column(String(200))
    cancelled_by: Mapped[str | None] = mapped_column(String(64))
    # `concurrency:` pool of the run (workspace, workflow and key); runs in one pool share its slots.
    concurrency_key: Mapped[str | None] = mapped_column(String(100))
    card_ts: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    wake_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    __table_args__ = (
        UniqueConstraint("event_id", "subscription_id"),
        # Partial: only what is read. A run that has ended is never due, pooled runs are few, and the state index
        # serves runs still going (their queries say `finished_at IS NULL`); see migration 0009.
        Index("ix_runs_due", "wake_at", postgresql_where=_WAKES, sqlite_where=_WAKES),
        Index("ix_runs_team_channel", "team_id", "channel_id", "created_at"),
        Index("ix_runs_concurrency", "concurrency_key", "state", postgresql_where=_POOLED, sqlite_where=_POOLED),
        # The App Home tab and the runs-active gauge; without them each read every run the workspace ever had.
        Index("ix_runs_state", "state", "team_id", "created_at", postgresql_where=_UNFINISHED,
              sqlite_where=_UNFINISHED),
        Index("ix_runs_team_created", "team_id", "created_at"),
        Index("ix_runs_team_workflow", "team_id", "workflow", "channel_id", "created_at"),
    )


class Step(Base):
    __tablename__ = "steps"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(16), ForeignKey("runs.id"))
    team_id: Mapped[str] = mapped_column(String(32))
    position: Mapped[int]
    step_id: Mapped[str] = mapped_column(String(100))
    title: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(default=0)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decided_by_name: Mapped[str | None] = mapped_column(String(200))
    decision: Mapped[str | None] = mapped_column(String(16))
    decided_at: Mapped[datetime | None]
    waiting_since: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_ms: Mapped[int | None]
    __table_args__ = (UniqueConstraint("run_id", "step_id"), Index("ix_steps_run", "run_id", "position"))


class PeriodicJob(Base):
    """When a periodic job (audit checkpoint, retention) last ran, so several processes run it once."""

    __tablename__ = "periodic_jobs"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_run_at: Mapped[datetime | None]
    running_until: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(String(64))


class AuditHead(Base):
    """The newest record of each workspace's chain: appends lock this row, so the chain stays one line."""

    __tablename__ = "audit_heads"
    team_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditRecord(Base):
    __tablename__ = "audit_records"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[str] = mapped_column(String(40))  # RFC 3339 UTC text: hashed exactly as stored
    actor: Mapped[str] = mapped_column(String(100))
    actor_name: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(60))
    run_id: Mapped[str | None] = mapped_column(String(16))
    workflow: Mapped[str | None] = mapped_column(String(100))
    workflow_hash: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[str | None] = mapped_column(String(100))
    outcome: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (UniqueConstraint("team_id", "seq"), Index("ix_audit_records_run", "run_id"))


class OutboxMessage(Base):
    """A Slack message to deliver, written with the state change that caused it."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(String(32))
    channel_id: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(16))
    # Messages of one lane are delivered one at a time in id order (a run's card before its thread replies).
    lane: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    not_before: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    result_ts: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Only pending messages (see migration 0011): the oldest ones, and a lane's.
    __table_args__ = (Index("ix_outbox_pending", "id", postgresql_where=_PENDING, sqlite_where=_PENDING),
                      Index("ix_outbox_pending_lanes", "lane", "id", postgresql_where=_PENDING,
                            sqlite_where=_PENDING))


# slack-sdk's OAuth tables (installations, bots, state), in our metadata so Alembic manages them too.
SLACK_INSTALLATIONS = SQLAlchemyInstallationStore.build_installations_table(Base.metadata, "slack_installations")
SLACK_BOTS = SQLAlchemyInstallationStore.build_bots_table(Base.metadata, "slack_bots")
SLACK_OAUTH_STATES = SQLAlchemyOAuthStateStore.build_oauth_states_table(Base.metadata, "slack_oauth_states")
# Tokens are stored sealed (see bot.slack.installations), which makes them longer than slack-sdk's 200 characters.
for _table in (SLACK_INSTALLATIONS, SLACK_BOTS):
    for _column in _table.columns:
        if _column.name.endswith(("_token", "refresh_token")):
            _column.type = Text()


class Secret(Base):
    __tablename__ = "secrets"
    team_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    set_by: Mapped[str] = mapped_column(String(64))
    set_by_name: Mapped[str | None] = mapped_column(String(200))
    set_at: Mapped[datetime]


class TriggerState(Base):
    """Where one subscription's `poll` or `schedule` trigger stands: when it is due, who holds it, how it went.

    A process claims a due row with a conditional update of its lease, so each poll and each scheduled time is
    handled by one process; the events it stores are deduplicated by the inbox all the same.
    """

    __tablename__ = "trigger_states"
    subscription_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(32))
    # The trigger configuration this state was built for: a changed `request` starts a new baseline, a changed
    # `cron` a new schedule.
    config_hash: Mapped[str] = mapped_column(String(64))
    next_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    # poll: the first successful poll's time (it sets the baseline and starts nothing), validators for
    # conditional requests, and the health shown in `/relay list`.
    baseline_at: Mapped[datetime | None]
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(String(100))
    last_success_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    failures: Mapped[int] = mapped_column(default=0)
    # schedule: the last due time that fired.
    last_fired_for: Mapped[datetime | None]
    __table_args__ = (Index("ix_trigger_states_due", "next_at"),)


class PollSeenKey(Base):
    """A key a subscription's poll has seen (its SHA-256), kept for the newest keys only."""

    __tablename__ = "poll_seen_keys"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subscription_id: Mapped[int] = mapped_column(BigId)
    key_hash: Mapped[str] = mapped_column(String(64))
    seen_at: Mapped[datetime]
    __table_args__ = (UniqueConstraint("subscription_id", "key_hash"),)
