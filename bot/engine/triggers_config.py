"""Trigger names allowed under `on:` and the model of each one's configuration."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from bot.engine.triggers.config import PollTrigger, ScheduleTrigger
from integrations.registry import INTEGRATIONS


class CommandTrigger(BaseModel):
    """`on: command`: started only by hand with `/relay run` (which any workflow also allows)."""

    model_config = ConfigDict(extra="forbid")


TRIGGER_CONFIGS: dict[str, type[BaseModel]] = {
    name: cls.trigger_config for name, cls in INTEGRATIONS.items() if cls.receives_webhooks
}
TRIGGER_CONFIGS["command"] = CommandTrigger
# Triggers relaybot runs itself (bot.engine.triggers): one subscription's events, started without a sender.
TRIGGER_CONFIGS["poll"] = PollTrigger
TRIGGER_CONFIGS["schedule"] = ScheduleTrigger
