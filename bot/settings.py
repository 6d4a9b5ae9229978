"""Every environment variable of SPEC.md, validated once at start-up.

`load_settings()` turns a pydantic validation error into one line that names the variable, which is what the
CLI prints before exiting; nothing else in the code reads the environment.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.engine.workflow import parse_duration
from bot.errors import ConfigError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(value: str | int) -> int:
    """`5MiB`, `512k`, `1048576` → bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 5MiB, 512KiB or a number of bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore",
                                      populate_by_name=True)

    slack_signing_secret: str | None = Field(default=None, validation_alias="SLACK_SIGNING_SECRET")
    slack_bot_token: str | None = Field(default=None, validation_alias="SLACK_BOT_TOKEN")
    slack_client_id: str | None = Field(default=None, validation_alias="SLACK_CLIENT_ID")
    slack_client_secret: str | None = Field(default=None, validation_alias="SLACK_CLIENT_SECRET")
    slack_app_token: str | None = Field(default=None, validation_alias="SLACK_APP_TOKEN")
    slack_api_url: str = Field(default="https://slack.com/api/", validation_alias="SLACK_API_URL")
    slack_authorize_url: str = Field(default="https://slack.com/oauth/v2/authorize",
                                     validation_alias="SLACK_AUTHORIZE_URL")

    database_url: str = Field(default="sqlite+aiosqlite:///relaybot.db", validation_alias="RELAYBOT_DATABASE_URL")
    master_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                        validation_alias="RELAYBOT_MASTER_KEYS")
    master_key_file: Path | None = Field(default=None, validation_alias="RELAYBOT_MASTER_KEY_FILE")
    workflows_dir: Path = Field(default=Path("workflows"), validation_alias="RELAYBOT_WORKFLOWS_DIR")
    public_url: str = Field(default="http://localhost:3000", validation_alias="RELAYBOT_PUBLIC_URL")
    admins: Annotated[list[str], NoDecode] = Field(default_factory=list, validation_alias="RELAYBOT_ADMINS")
    http_allow: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                       validation_alias="RELAYBOT_HTTP_ALLOW")
    max_body: int = Field(default=5 * 1024 * 1024, validation_alias="RELAYBOT_MAX_BODY")
    # How long a webhook's body may take to arrive once its headers have (a stalled sender gets `408`).
    body_timeout: float = Field(default=30.0, gt=0, validation_alias="RELAYBOT_BODY_TIMEOUT")
    # Stored events waiting to become runs at which new webhooks get `503` + `Retry-After` (0: no limit).
    max_backlog: int = Field(default=100_000, ge=0, validation_alias="RELAYBOT_MAX_BACKLOG")
    slack_channel_rate: float = Field(default=1.0, ge=0, validation_alias="RELAYBOT_SLACK_CHANNEL_RATE")
    command: str = Field(default="/relay", validation_alias="RELAYBOT_COMMAND")
    audit_channel: str | None = Field(default=None, validation_alias="RELAYBOT_AUDIT_CHANNEL")
    retention_days: int = Field(default=90, ge=1, validation_alias="RELAYBOT_RETENTION_DAYS")
    # How late a scheduled time may still fire after downtime; older missed times are skipped (and logged).
    schedule_grace: Annotated[timedelta, BeforeValidator(parse_duration)] = Field(
        default=timedelta(minutes=15), ge=timedelta(0), validation_alias="RELAYBOT_SCHEDULE_GRACE")
    log_level: str = Field(default="INFO", validation_alias="RELAYBOT_LOG_LEVEL")
    host: str = Field(default="0.0.0.0", validation_alias="RELAYBOT_HOST")  # noqa: S104
    port: int = Field(default=3000, ge=0, le=65535, validation_alias="PORT")
    # `relaybot serve` processes sharing the port (`--workers` overrides it); see bot/cli/workers.py.
    workers: int = Field(default=1, ge=1, validation_alias="RELAYBOT_WORKERS")

    github_api_url: str = Field(default="https://api.github.com", validation_alias="RELAYBOT_GITHUB_API_URL")
    gitlab_api_url: str = Field(default="https://gitlab.com/api/v4", validation_alias="RELAYBOT_GITLAB_API_URL")
    pagerduty_api_url: str = Field(default="https://api.pagerduty.com", validation_alias="RELAYBOT_PAGERDUTY_API_URL")

    # Tunables that operators rarely touch; tests shorten them.
    worker_poll_interval: float = Field(default=1.0, gt=0, validation_alias="RELAYBOT_POLL_INTERVAL")
    lease_seconds: float = Field(default=60.0, gt=0, validation_alias="RELAYBOT_LEASE_SECONDS")
    # Runs one process advances at a time (a step in flight holds one until it ends or times out).
    run_concurrency: int = Field(default=32, ge=1, le=10_000, validation_alias="RELAYBOT_RUN_CONCURRENCY")
    outbox_lease_seconds: float = Field(default=30.0, gt=0, validation_alias="RELAYBOT_OUTBOX_LEASE_SECONDS")
    http_timeout: float = Field(default=30.0, gt=0, validation_alias="RELAYBOT_HTTP_TIMEOUT")
    http_max_response: int = Field(default=10 * 1024 * 1024, validation_alias="RELAYBOT_HTTP_MAX_RESPONSE")

    @field_validator("master_keys", "admins", "http_allow", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("master_key_file", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: Any) -> Any:
        """`RELAYBOT_MASTER_KEY_FILE=` left empty in an env file means unset (it was the current directory)."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("max_body", "http_max_response", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)

    @field_validator("slack_api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as https://slack.com/api/")
        return value if value.endswith("/") else value + "/"

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"not a log level (one of {', '.join(LOG_LEVELS)})")
        return level

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """The two databases relaybot runs on, each with its async driver; the plain forms other tools print
        (`postgres://…`, `postgresql://…`, `sqlite:///…`) are taken to mean the same."""
        scheme, separator, rest = value.partition("://")
        if separator and scheme in ("sqlite", "sqlite+aiosqlite"):
            return f"sqlite+aiosqlite://{rest}"
        if separator and scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
            return f"postgresql+asyncpg://{rest}"
        raise ValueError("relaybot runs on SQLite or PostgreSQL: use sqlite+aiosqlite:///path/relaybot.db or "
                         f"postgresql+asyncpg://user:password@host/database (got a {scheme or 'malformed'!r} URL)")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as https://relaybot.example.com")
        return value.rstrip("/")

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value):
            raise ValueError("must look like /relay")
        return value

    @model_validator(mode="after")
    def _oauth_pair(self) -> Settings:
        if bool(self.slack_client_id) != bool(self.slack_client_secret):
            missing = "SLACK_CLIENT_SECRET" if self.slack_client_id else "SLACK_CLIENT_ID"
            raise ValueError(f"{missing} is required when the other OAuth variable is set")
        return self

    def integration_base_urls(self) -> dict[str, str]:
        """API base URLs of the integrations (GitHub Enterprise, self-hosted GitLab …)."""
        return {"github": self.github_api_url, "gitlab": self.gitlab_api_url, "pagerduty": self.pagerduty_api_url}

    @property
    def oauth_enabled(self) -> bool:
        return bool(self.slack_client_id and self.slack_client_secret)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def require_for_serve(self, *, socket_mode: bool = False) -> None:
        """What `relaybot serve` cannot start without, as one precise error."""
        if not self.slack_signing_secret and not socket_mode:
            raise ConfigError("SLACK_SIGNING_SECRET is required for `relaybot serve` "
                              "(Slack app settings → Basic Information → Signing Secret)")
        if not self.slack_bot_token and not self.oauth_enabled:
            raise ConfigError("SLACK_BOT_TOKEN is required for `relaybot serve` "
                              "(or SLACK_CLIENT_ID and SLACK_CLIENT_SECRET for OAuth installs)")
        if socket_mode and not self.slack_app_token:
            raise ConfigError("SLACK_APP_TOKEN is required for `relaybot serve --socket-mode` (an xapp- token)")
        if self.slack_bot_token and not self.slack_bot_token.startswith("xoxb-"):
            raise ConfigError("SLACK_BOT_TOKEN must be a bot token starting with xoxb-")


_ALIASES = {name: str(field.validation_alias) for name, field in Settings.model_fields.items()}


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise ConfigError naming the first bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = _ALIASES.get(field, field)
        if isinstance(error.get("ctx"), dict) and "error" in error["ctx"]:
            message = str(error["ctx"]["error"])
        else:
            message = error["msg"]
        if not variable:
            raise ConfigError(message) from None
        raise ConfigError(f"{variable}: {message}") from None
