"""The integrations and actions relaybot knows, by name."""

from __future__ import annotations

from typing import Any

from integrations.alertmanager import Alertmanager
from integrations.base import Action, Integration
from integrations.github import GitHub
from integrations.gitlab import GitLab
from integrations.http import Request
from integrations.pagerduty import PagerDuty
from integrations.slack import Post
from integrations.webhook import Webhook

INTEGRATIONS: dict[str, type[Integration]] = {
    cls.name: cls for cls in (Webhook, GitHub, GitLab, PagerDuty, Alertmanager)
}

ACTIONS: dict[str, type[Action[Any, Any]]] = {cls.name: cls for cls in (Request, Post)}
for _integration in INTEGRATIONS.values():
    for _action in _integration.actions:
        ACTIONS[_action.name] = _action


def integration(name: str) -> Integration:
    return INTEGRATIONS[name]()


def action(name: str) -> Action[Any, Any]:
    return ACTIONS[name]()
