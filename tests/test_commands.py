"""`/relay` through signed slash commands: the replies a person sees."""

from __future__ import annotations

from sqlalchemy import select

from bot.store.models import AuditRecord, Event, Subscription
from tests.conftest import ADMIN, ALICE, CHANNEL, TEAM, connection_from, write_workflow

DEPLOY = """
name: deploy
title: Deploy
description: Ship it after approval.
params:
  env: {default: staging, choices: [staging, production], description: Target environment}
  replicas: {default: 2, choices: [1, 2, 3]}
on: {github: {events: [push]}}
steps:
  - id: ship
    uses: http.request
    with: {url: "TARGET/ship", method: POST, json: {env: "${{ params.env }}", replicas: "${{ params.replicas }}",
                                                     who: "${{ event.who }}"}}
"""


async def deploy_bot(make_bot, workflows, target):
    write_workflow(workflows, "deploy", DEPLOY.replace("TARGET", target.url))
    return await make_bot()


async def test_help_and_unknown_subcommand(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert "`/relay enable <workflow>" in await bot.command("help")
    assert "`/relay enable <workflow>" in await bot.command("")
    assert await bot.command("frobnicate") == "I don't know `/relay frobnicate`. Try `/relay help`."


async def test_list_marks_what_is_enabled_here(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert ":white_circle: `deploy` — Deploy _(on github, command)_" in await bot.command("list")
    await bot.command("enable deploy")
    listing = await bot.command("list")
    assert ":large_green_circle: `deploy`" in listing and "Ship it after approval." in listing
    assert ":white_circle: `deploy`" in await bot.command("list", channel="C0OTHER01")


async def test_enable_checks_arguments_and_admin(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert (await bot.command("enable nope")).startswith("There is no workflow named `nope`")
    assert "`oops` is not `key=value`" in await bot.command("enable deploy oops")
    assert "has no parameter `color`" in await bot.command("enable deploy color=red")
    assert (await bot.command("enable deploy env=prod")
            == "`env=prod` is not allowed for `deploy`: choose one of `staging`, `production`.")
    assert "Which workflow?" in await bot.command("enable")
    refusal = await bot.command("enable deploy", user=ALICE)
    assert refusal == "Only workspace admins and owners (or the users in RELAYBOT_ADMINS) can enable workflows."
    reply = await bot.command('enable deploy env=production replicas=3')
    assert "`deploy` enabled in this channel with `env=production`, `replicas=3`." in reply
    url, secret = connection_from(reply, "github")
    assert url.startswith(bot.url + "/hooks/c_") and secret.startswith("whsec_")
    again = await bot.command("enable deploy env=staging")
    assert "`deploy` updated in this channel: now with `env=staging`, `replicas=3`." in again
    assert "connection URL" in again and secret not in again
    assert "already enabled in this channel with `env=staging`, `replicas=3`. Nothing changed." in await bot.command(
        "enable deploy replicas=3")
    assert "now with `env=staging`." in await bot.command("enable deploy replicas=")  # back to its default
    assert await bot.command("enable deploy env=staging env=production") == (
        "`env` is given twice; give each parameter once.")
    async with bot.services.db.read() as session:
        subscription = (await session.execute(select(Subscription))).scalar_one()
        actions = [r.action for r in (await session.execute(select(AuditRecord).order_by(AuditRecord.seq))).scalars()]
    assert subscription.params == {"env": "staging"} and subscription.channel_id == CHANNEL
    assert actions == ["subscription.enabled", "connection.created", "subscription.updated", "subscription.updated"]


async def test_extra_admins_from_settings(make_bot, workflows, target):
    write_workflow(workflows, "deploy", DEPLOY.replace("TARGET", target.url))
    bot = await make_bot(admins=[ALICE])
    assert "`deploy` enabled" in await bot.command("enable deploy", user=ALICE)


async def test_disable(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert await bot.command("disable deploy") == "`deploy` is not enabled in this channel."
    assert await bot.command("disable deplyo") == ("`deplyo` is not enabled in this channel, and there is no "
                                                   "workflow of that name. `/relay list` shows the workflows.")
    await bot.command("enable deploy")
    assert "is disabled in this channel" in await bot.command("disable deploy")
    assert ":white_circle: `deploy`" in await bot.command("list")


async def test_run_by_hand_uses_arguments_as_the_event(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    await bot.command("enable deploy env=production")
    reply = await bot.command("run deploy who=alice replicas=1", user=ALICE)
    assert reply.startswith("Started run `R") and "`deploy`" in reply
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run succeeded")
    assert "started by <@U0ALICE01> with `/relay run`" in thread[0]
    [request] = target.requests_to("/ship")
    assert request.json() == {"env": "production", "replicas": 1, "who": "alice"}
    assert "not allowed" in await bot.command("run deploy replicas=9")


async def test_run_by_hand_is_not_filtered_by_the_workflow_if(make_bot, workflows, target):
    """`if:` filters the tools' events; `/relay run` is a person asking for a run (docs/workflows.md)."""
    write_workflow(workflows, "merged", f"""
        name: merged
        on: webhook
        if: event.action == "closed"
        steps:
          - id: ship
            if: event.action != "skip"
            uses: http.request
            with: {{url: "{target.url}/ship", method: POST}}
        """)
    bot = await make_bot()
    assert (await bot.command("run merged action=opened")).startswith("Started run")
    assert (await bot.command("run merged action=skip")).startswith("Started run")
    await bot.settle()
    assert len(target.requests_to("/ship")) == 1  # the step's own `if:` still holds


REQUIRED = """
name: page
title: Page someone
params:
  service: {required: true, description: the service to page for}
  note: {default: ""}
on: {command: {}}
steps:
  - id: page
    uses: http.request
    with: {url: "TARGET/page", method: POST, json: {service: "${{ params.service }}", note: "${{ params.note }}"}}
"""


async def test_run_by_hand_needs_the_required_parameters(make_bot, workflows, target):
    write_workflow(workflows, "page", REQUIRED.replace("TARGET", target.url))
    bot = await make_bot()
    missing = "`page` needs `service=…` (the service to page for)."
    assert await bot.command("run page") == missing
    assert await bot.command("run page service=") == missing  # an empty value is no value
    assert await bot.command("run page service=api service=db") == "`service` is given twice; give each parameter once."
    assert await bot.command("enable page") == missing
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Event))).scalars().all() == []  # a refused run stores nothing
    assert "`page` enabled" in await bot.command("enable page service=api")
    assert (await bot.command("run page")).startswith("Started run")  # the channel's subscription gives it
    # Slack's clients may type typographic double quotes (U+201C, U+201D); U+2019 stays an apostrophe.
    assert (await bot.command("run page service=db note=\u201cdon\u2019t wake anyone\u201d")).startswith("Started")
    await bot.settle()
    assert sorted((request.json()["service"], request.json()["note"]) for request in target.requests_to("/page")) == [
        ("api", ""), ("db", "don\u2019t wake anyone")]


async def test_connect_shows_the_secret_once_and_rotates(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert "Only workspace admins" in await bot.command("connect github", user=ALICE)
    first = await bot.command("connect github")
    url, secret = connection_from(first, "github")
    second = await bot.command("connect github")
    assert url in second and secret not in second
    rotated = await bot.command("connect github rotate")
    assert url in rotated and "New secret" in rotated
    new_secret = rotated.split("connection: `")[1].split("`")[0]
    assert new_secret != secret
    assert (await bot.github(url, secret, {"zen": "x"}, event="ping"))[0] == 401
    assert (await bot.github(url, new_secret, {"zen": "x"}, event="ping"))[0] == 200
    assert "I don't know the integration `jira`" in await bot.command("connect jira")
    assert await bot.command("connect github rotate now") == "`/relay connect github rotate` takes nothing more. " \
                                                             "Nothing was changed."
    assert (await bot.github(url, new_secret, {"zen": "x"}, event="ping"))[0] == 200  # not rotated


async def test_a_secret_typed_after_connect_is_not_echoed_and_is_called_exposed(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    pasted, quoted = "pd_Zx81kQ7mW2", "p4ss'w0rd"  # a quote once made it "check the quotes", inviting a retype
    for text, user in ((f"connect pagerduty {pasted}", ADMIN), (f"connect pagerduty set-secret {pasted}", ADMIN),
                       (f"connect github set-secret {pasted}", ALICE), (f"connect github {pasted}", ALICE),
                       (f"connect pagerduty set-secret {quoted}", ADMIN), (f"secret set DEPLOY_TOKEN {quoted}", ALICE)):
        reply = await bot.command(text, user=user)
        assert pasted not in reply and pasted.lower() not in reply and "w0rd" not in reply, text
        assert "treat it as exposed" in reply and "Nothing was" in reply, text
    async with bot.services.db.read() as session:
        assert (await session.execute(select(AuditRecord))).scalars().all() == []


async def test_an_existing_connection_does_not_point_to_a_secret_that_is_not_shown(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    for integration in ("github", "gitlab", "alertmanager", "webhook"):
        first = await bot.command(f"connect {integration}")
        assert "Secret: `" in first and "the secret above" in first, integration
        again = await bot.command(f"connect {integration}")
        assert "Secret: `" not in again and "the secret above" not in again, integration
        assert "the connection's secret (shown when it was created)" in again, integration


async def test_replies_name_the_command_the_workspace_installed(make_bot, workflows, target, slack):
    bot = await deploy_bot(make_bot, workflows, target)
    await bot.stop()
    bot = await make_bot(command="/ops")
    for text in ("connect github", "connect github", "connect pagerduty", "help"):
        before = len(slack.responses)
        status, _ = await slack.slash_command(TEAM, CHANNEL, ADMIN, text, command="/ops")
        assert status == 200
        await slack.wait_for(lambda count=before: len(slack.responses) > count)
        reply = str(slack.responses[before]["text"])
        assert "/relay" not in reply and "`/ops " in reply, (text, reply)


async def test_a_secret_rotated_by_one_process_is_accepted_at_once_by_another(make_bot, workflows, target):
    """Each process keeps connection secrets for a few seconds. Another process's rotation must not make it
    reject the new secret meanwhile: GitHub does not redeliver a webhook that was refused."""
    first = await deploy_bot(make_bot, workflows, target)
    url, secret = connection_from(await first.command("connect github"), "github")
    assert (await first.github(url, secret, {"zen": "x"}, event="ping"))[0] == 200  # now cached by `first`
    second = await make_bot()  # the same database; Slack now sends the commands to this one
    rotated = await second.command("connect github rotate")
    new_secret = rotated.split("connection: `")[1].split("`")[0]
    assert (await first.github(url, new_secret, {"zen": "y"}, event="ping"))[0] == 200
    assert (await first.github(url, secret, {"zen": "z"}, event="ping"))[0] == 401  # the new one is cached now
    assert (await second.github(url.replace(first.url, second.url), secret, {"zen": "z"}, event="ping"))[0] == 401


async def test_runs_and_status(make_bot, workflows, target):
    bot = await deploy_bot(make_bot, workflows, target)
    assert await bot.command("runs") == "No runs in this channel yet."
    assert await bot.command("runs deploy") == "No runs of `deploy` here yet."
    assert await bot.command("runs nope") == ("There is no workflow named `nope`. `/relay list` shows the "
                                              "workflows.")
    await bot.command("enable deploy")
    started = await bot.command("run deploy who=x")
    run_id = started.split("`")[1]
    card = await bot.wait_card()
    await bot.wait_thread(card, "Run succeeded")
    runs = await bot.command("runs")
    assert run_id in runs and "succeeded" in runs
    status = await bot.command(f"status {run_id.lower()}")
    assert f"*Run `{run_id}`*" in status and "ship — succeeded" in status
    assert "There is no run `RNOPE`" in await bot.command("status RNOPE")


async def test_bot_not_in_the_channel_is_explained(make_bot, workflows, target, slack):
    from bot.store.models import OutboxMessage, Run

    slack.add_channel(TEAM, "C0PRIVATE", "private", bot_member=False)
    bot = await deploy_bot(make_bot, workflows, target)
    reply = await bot.command("enable deploy", channel="C0PRIVATE")
    assert "I am not in this channel yet" in reply and "/invite @relaybot" in reply
    # By hand: refused at once, in a channel the bot is not in and in one it cannot even see.
    for channel in ("C0PRIVATE", "C0UNSEEN1"):
        refusal = await bot.command("run deploy who=x", channel=channel)
        assert refusal.startswith("I am not in this channel") and "nothing was started" in refusal, channel
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Run))).scalars().all() == []
    # From a webhook: the run goes on, and whoever enabled the workflow is told its card could not be posted.
    url, secret = connection_from(reply, "github")
    assert (await bot.github(url, secret, {"ref": "refs/heads/main"}, event="push"))[0] == 202
    dm = await slack.wait_for(lambda: [m for m in slack.teams[TEAM].messages.get(ADMIN, [])])
    assert "could not post its card in <#C0PRIVATE> (not_in_channel)" in dm[0].text
    assert "I will not tell you again about `deploy` there for 1 h." in dm[0].text
    # A burst of webhooks does not become a burst of direct messages.
    for delivery in ("again-1", "again-2"):
        assert (await bot.github(url, secret, {"ref": "refs/heads/main"}, event="push", delivery=delivery))[0] == 202
    await bot.settle()
    assert len(slack.teams[TEAM].messages.get(ADMIN, [])) == 1
    async with bot.services.db.read() as session:
        states = set((await session.execute(select(OutboxMessage.state))).scalars())
    assert "failed" in states and "pending" not in states


async def test_an_unexpected_error_shows_a_reference_that_is_in_the_log(make_bot, workflows, target, caplog,
                                                                        monkeypatch):
    from bot.slack import commands

    bot = await deploy_bot(make_bot, workflows, target)

    async def broken(services, command, words):
        raise RuntimeError("the database fell over")

    monkeypatch.setitem(commands.SUBCOMMANDS, "runs", broken)
    reply = await bot.command("runs")
    assert reply.startswith("Something went wrong on relaybot's side (reference `")
    reference = reply.split("`")[1]
    assert len(reference) == 8
    logged = [record for record in caplog.records if reference in record.getMessage()]
    assert logged and "the database fell over" in (logged[0].exc_text or "")
    assert "Traceback" not in reply and "RuntimeError" not in reply


async def test_workflows_are_not_enabled_or_run_in_a_direct_message(make_bot, workflows, target):
    """relaybot cannot see who is in a DM, and took one for a conversation everyone is in: a workflow enabled
    there had its runs listed, approvable and cancellable by the whole workspace."""
    from bot.store.models import Run

    bot = await deploy_bot(make_bot, workflows, target)
    for text in ("enable deploy", "run deploy who=x"):
        refusal = await bot.command(text, channel="D0DIRECT01")
        assert refusal.startswith("Workflows run in channels") and f"`/relay {text.split()[0]}`" in refusal, refusal
    async with bot.services.db.read() as session:
        assert (await session.execute(select(Subscription))).scalars().all() == []
        assert (await session.execute(select(Run))).scalars().all() == []
    assert not await bot.services.people.in_channel(TEAM, ALICE, "D0DIRECT01")
