"""Trigger names allowed under `on:` and the model of each one's configuration."""

from __future__ import annotations

from pydantic import BaseModel

from integrations.registry import INTEGRATIONS

TRIGGER_CONFIGS: dict[str, type[BaseModel]] = {
    name: cls.trigger_config for name, cls in INTEGRATIONS.items() if cls.receives_webhooks
}
