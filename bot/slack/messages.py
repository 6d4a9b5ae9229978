"""Every sentence relaybot says to people, in one place.

Texts are Slack mrkdwn. Values that came from events or users are escaped (`escape`) before they are put
into a message, so a branch named `<!channel>` cannot ping a channel.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any


def escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


MAX_LINK = 2000


def link_target(url: Any) -> str | None:
    """A URL made safe to stand inside `<…|…>`, or None when it is not an http(s) URL: characters that would
    end the link or start another (`<`, `>`, `|`, spaces, control characters) are percent-encoded and `&` is
    escaped, so event data cannot turn a link into a mention or a second link of its own."""
    if not isinstance(url, str):
        return None
    url = url.strip()
    if not url.lower().startswith(("https://", "http://")) or len(url) > MAX_LINK:
        return None
    safe = "".join(f"%{ord(char):02X}" if char in '<>|"' or char.isspace() or ord(char) < 32 or ord(char) == 127
                   else char for char in url)
    return safe.replace("&", "&amp;")


def user(user_id: str | None, name: str | None = None) -> str:
    if user_id and user_id[:1] in ("U", "W"):
        return f"<@{user_id}>"
    return escape(name or user_id or "someone")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def span(delta: timedelta) -> str:
    return duration(delta.total_seconds())


def slack_date(moment: datetime) -> str:
    """A date every reader sees in their own time zone (with a UTC fallback for old clients)."""
    stamp = int(moment.timestamp())
    return f"<!date^{stamp}^{{date_short_pretty}} {{time}}|{moment:%Y-%m-%d %H:%M} UTC>"


def short_result(outputs: dict[str, Any] | None) -> str:
    if not outputs:
        return ""
    if "status" in outputs and isinstance(outputs["status"], int):
        return f"HTTP {outputs['status']}"
    if outputs.get("url"):
        return escape(outputs["url"])
    if "ts" in outputs and "channel" in outputs:
        return f"posted to <#{outputs['channel']}>"
    text = json.dumps(outputs, separators=(", ", ": "), default=str)
    return escape(text if len(text) <= 120 else text[:117] + "...")


def step_name(title: str) -> str:
    return f"*{escape(title)}*"


# --------------------------------------------------------------------------------------------- audit thread


def thread_run_started(*, run_id: str, kind: str, source: str, delivery: str | None, started_by: str | None,
                       workflow: str, command: str = "/relay") -> str:
    if started_by:
        origin = f"started by {user(started_by)} with `{command} run`"
    else:
        article = "an" if source[:1].lower() in "aeiou" else "a"
        origin = f"started by {article} {escape(source)} event `{escape(kind)}`"
    # Deliveries without an id of the sender's get one of ours ("auto:…"); it says nothing to a reader.
    delivery_text = f", delivery `{escape(delivery)}`" if delivery and not delivery.startswith("auto:") else ""
    return f":arrow_forward: Run `{run_id}` of *{escape(workflow)}* {origin}{delivery_text}."


def thread_step_waiting(*, title: str, approvers: str, timeout: timedelta) -> str:
    return (f":double_vertical_bar: {step_name(title)} is waiting for approval by {approvers} "
            f"(times out in {span(timeout)}).")


def thread_step_approved(*, title: str, user_id: str, name: str | None) -> str:
    return f":white_check_mark: {step_name(title)} approved by {user(user_id, name)}."


SKIP_ICON = ":black_right_pointing_double_triangle_with_vertical_bar:"


def thread_step_skipped_by(*, title: str, user_id: str, name: str | None) -> str:
    return f"{SKIP_ICON} {step_name(title)} skipped by {user(user_id, name)}."


def thread_step_skipped(*, title: str, reason: str) -> str:
    return f":black_right_pointing_double_triangle_with_vertical_bar: {step_name(title)} skipped: {escape(reason)}."


def thread_step_started(*, title: str, attempt: int, attempts: int, resumed: bool = False) -> str:
    of = f" (attempt {attempt} of {attempts})" if attempts > 1 else ""
    if resumed:
        return (f":arrows_counterclockwise: {step_name(title)} started again{of}: the process running it stopped "
                "before it finished.")
    return f":arrows_counterclockwise: {step_name(title)} started{of}."


def thread_step_finished(*, title: str, outcome: str, seconds: float | None, result: str) -> str:
    icons = {"succeeded": ":heavy_check_mark:", "failed": ":x:", "timed_out": ":hourglass:"}
    icon = icons.get(outcome, ":grey_question:")
    tail = f": {result}" if result else "."
    return f"{icon} {step_name(title)} {outcome.replace('_', ' ')} in {duration(seconds)}{tail}"


def thread_step_unknown(*, title: str, action: str) -> str:
    return (f":grey_question: {step_name(title)}: outcome unknown. The process running `{action}` stopped before it "
            "finished, and it may or may not have taken effect. Check, then choose *Retry* or *Skip* on the card.")


def card_unknown(*, title: str, approvers: str) -> str:
    return f":grey_question: *{escape(title)}*: outcome unknown — retry it or skip it ({approvers})"


def thread_step_retry_requested(*, title: str, user_id: str, name: str | None) -> str:
    return f":repeat: {step_name(title)}: {user(user_id, name)} chose to retry it."


def thread_step_retry(*, title: str, attempt: int, attempts: int, error: str, delay: timedelta) -> str:
    return (f":repeat: {step_name(title)} failed (attempt {attempt} of {attempts}): {escape(error)}. "
            f"Retrying in {span(delay)}.")


def thread_step_timed_out(*, title: str, waited: timedelta, continues: bool) -> str:
    then = "the run goes on" if continues else "the run fails"
    return f":hourglass: {step_name(title)} timed out after waiting {span(waited)} for approval; {then}."


def thread_run_finished(*, outcome: str, counts: dict[str, int], seconds: float) -> str:
    icon = {"succeeded": ":checkered_flag:", "failed": ":x:", "cancelled": ":octagonal_sign:"}[outcome]
    order = ("succeeded", "failed", "skipped", "timed_out", "cancelled")
    parts = [f"{counts[state]} {state.replace('_', ' ')}" for state in order if counts.get(state)]
    summary = ", ".join(parts) if parts else "no steps"
    return f"{icon} Run {outcome}: {summary}; {duration(seconds)} in all."


NO_THREAD_TO_REPLY_IN = ("`thread: true` needs the run's card, and Slack refused to post it ({error}); is relaybot "
                         "in the channel?")


def thread_run_queued(*, reason: str) -> str:
    return f":hourglass_flowing_sand: Queued until a slot is free ({escape(reason)})."


def thread_run_not_run(*, reason: str) -> str:
    return f":no_entry_sign: Not run: {escape(reason)}."


def thread_run_cancelled(*, user_id: str | None, name: str | None) -> str:
    return f":octagonal_sign: Run cancelled by {user(user_id, name)}."


# ------------------------------------------------------------------------------------------------ the card

STATUS_TEXT = {
    "queued": ":large_blue_circle: queued",
    "running": ":arrows_counterclockwise: running",
    "waiting": ":double_vertical_bar: waiting for approval",
    "succeeded": ":white_check_mark: succeeded",
    "failed": ":x: failed",
    "cancelled": ":octagonal_sign: cancelled",
}

STEP_ICON = {
    "pending": ":white_circle:", "waiting": ":double_vertical_bar:", "approved": ":white_check_mark:",
    "running": ":arrows_counterclockwise:", "succeeded": ":heavy_check_mark:", "failed": ":x:",
    "skipped": ":black_right_pointing_double_triangle_with_vertical_bar:", "timed_out": ":hourglass:",
    "cancelled": ":octagonal_sign:", "unknown": ":grey_question:",
}

APPROVE = "Approve"
SKIP = "Skip"
RETRY = "Retry"


def card_waiting(*, title: str, approvers: str) -> str:
    return f":double_vertical_bar: *{escape(title)}* needs approval ({approvers})"


def card_step_line(*, state: str, title: str, decided: str | None, detail: str | None) -> str:
    text = f"{STEP_ICON.get(state, ':white_circle:')} {escape(title)} — {state.replace('_', ' ')}"
    if decided:
        text += f" ({decided})"
    if detail:
        text += f": {detail}"
    return text


def approvers_text(users: list[str], groups: list[str], *, allow_self: bool = True) -> str:
    names = [f"<@{u}>" for u in users] + [f"@{escape(g)}" if not g.startswith("S") else f"<!subteam^{g}>"
                                           for g in groups]
    text = ", ".join(names) if names else "anyone in the channel"
    return text if allow_self else f"{text}, not whoever started the run"


# -------------------------------------------------------------------------------------- clicks on the card

CLICK_ALREADY_DECIDED = "This step was already decided: {state}. Nothing was changed."
CLICK_STALE = "This card is out of date: the step is no longer waiting. Nothing was changed."
CLICK_RUN_CANCELLED = "This run was cancelled by {who}, so its steps can no longer be decided. Nothing was changed."
CLICK_NOT_APPROVER = "You are not one of the approvers of *{title}* ({approvers}). Nothing was changed."
CLICK_SELF = "You started this run, and this workflow does not let the person who started a run approve it."
HOME_CHANNELS_UNKNOWN = ("relaybot could not ask Slack which channels you are in ({error}), so this tab shows "
                         "no channel's workflows or runs; open it again in a moment.")
CLICK_NOT_IN_CHANNEL = "Anyone in <#{channel}> may decide this step, and you are not in it. Nothing was changed."
CLICK_UNKNOWN_RUN = "This run does not exist in this workspace."
CLICK_LOOKUP_FAILED = ("relaybot could not check the approvers with Slack just now ({error}); nothing was "
                       "changed. Try again in a moment.")
CLICK_NOT_ALLOWED_KIND = "Guests, bots and deactivated accounts cannot approve steps."

# ----------------------------------------------------------------------------------------- slash commands


def help_text(command: str) -> str:
    return "\n".join([
        "*relaybot* runs workflows from your tools' events in this channel, with approvals and an audit thread.",
        f"`{command} list` — the workflows, and which are enabled here",
        f"`{command} enable <workflow> [key=value …]` — enable a workflow in this channel (admins)",
        f"`{command} disable <workflow>` — disable it here (admins); running runs finish",
        f"`{command} run <workflow> [key=value …]` — start a run now",
        f"`{command} runs [workflow]` — the latest runs in this channel",
        f"`{command} status <run>` — a run's steps · `{command} cancel <run>` (approvers and admins)",
        f"`{command} connect <integration> [rotate|set-secret]` — the webhook URL for a tool (admins)",
        f"`{command} secret set <NAME>` · `{command} secret list` · `{command} secret delete <NAME>` — "
        "secrets for workflows, typed into a form, never into the channel (admins)",
        f"`{command} help` — this text",
    ])


UNREADABLE_COMMAND = "I could not read that command: {problem} (check the quotes)."
UNKNOWN_SUBCOMMAND = "I don't know `{command} {word}`. Try `{command} help`."
NEED_WORKFLOW = "Which workflow? `{command} {sub} <workflow>` — `{command} list` shows them."
UNKNOWN_WORKFLOW = "There is no workflow named `{name}`. `{command} list` shows the workflows."
NOT_ADMIN = "Only workspace admins and owners (or the users in RELAYBOT_ADMINS) can {what}."
BAD_ARGUMENT = "`{text}` is not `key=value`. Example: `{command} {sub} {workflow} env=production`."
DUPLICATE_ARGUMENT = "`{key}` is given twice; give each parameter once."
UNKNOWN_PARAM = "`{workflow}` has no parameter `{key}`. Its parameters: {known}."
NO_PARAMS = "`{workflow}` takes no parameters."
BAD_CHOICE = "`{key}={value}` is not allowed for `{workflow}`: choose one of {choices}."
MISSING_PARAM = "`{workflow}` needs `{key}=…` ({description})."
NOT_ENABLED = "`{workflow}` is not enabled in this channel."
NOT_ENABLED_UNKNOWN = ("`{workflow}` is not enabled in this channel, and there is no workflow of that name. "
                       "`{command} list` shows the workflows.")
NOT_IN_CHANNEL = (":warning: I am not in this channel yet, so I cannot post run cards here. Invite me with "
                  "`/invite @relaybot`.")
def card_undeliverable(*, run_id: str, workflow: str, channel: str, error: str, quiet: str) -> str:
    return (f":warning: Run `{run_id}` of `{workflow}` could not post its card in <#{channel}> ({error}). Invite "
            f"me there with `/invite @relaybot`, or disable the workflow in that channel; its approvals can still "
            f"be given from my Home tab. _I will not tell you again about `{workflow}` there for {quiet}._")
DISABLED = "`{workflow}` is disabled in this channel. Runs already going will finish."
RUN_STARTED = "Started run `{run_id}` of `{workflow}`; its card follows in this channel."
RUN_NOT_IN_CHANNEL = ("I am not in this channel, so I could not post the run's card or its thread here: nothing "
                      "was started. Invite me with `/invite @relaybot`, or start `{workflow}` in a channel I am in.")
RUN_BY_ADMINS = "Only admins can start `{workflow}` by hand."
NOT_IN_A_DM = ("Workflows run in channels: their cards, approvals and threads are for the people in one, and "
               "in a direct message I cannot tell who that is. Use `{command} {sub}` in a channel I am in.")
NO_RUNS = "No runs in this channel yet."
NO_RUNS_OF = "No runs of `{workflow}` here yet."
NEED_RUN = "Which run? `{command} {sub} <run id>` — `{command} runs` lists them."
UNKNOWN_RUN = "There is no run `{run_id}` in the channels you are in."
RUN_LOOKUP_FAILED = ("relaybot could not check with Slack which channels you are in ({error}); try again in a "
                     "moment.")
CANCEL_NOT_ALLOWED = "Only admins and the approvers of `{workflow}` can cancel its runs."
CANCEL_ALREADY_ENDED = "Run `{run_id}` has already ended ({state}); nothing to cancel."
CANCELLED = "Run `{run_id}` is cancelled. A step already running finishes; nothing else will run."


def run_line(*, run_id: str, state: str, workflow: str, summary: str, created_at: datetime, url: str) -> str:
    target = link_target(url)
    return (f"`{run_id}` {STATUS_TEXT.get(state, state)} · `{workflow}` · {escape(summary)} · "
            f"{slack_date(created_at)} · " + (f"<{target}|thread>" if target else "thread"))


def run_list(lines: list[str]) -> str:
    return "*Latest runs here*\n" + "\n".join(lines)


def run_status(*, run_id: str, workflow: str, channel_id: str, state: str, summary: str,
               step_lines: list[str]) -> str:
    return "\n".join([f"*Run `{run_id}`* of `{workflow}` in <#{channel_id}>: {STATUS_TEXT.get(state, state)}",
                      escape(summary), *step_lines])


UNKNOWN_INTEGRATION = "I don't know the integration `{name}`. Integrations: {known}."
NEED_INTEGRATION = "Which integration? `{command} connect <integration>` — one of {known}."
# A word typed after `connect <integration>` may be a secret pasted in the wrong place: it is never echoed,
# and the person is told what to do if it was one.
CONNECT_EXTRA = ("`{command} connect {name}` takes nothing more, `rotate` or `set-secret`. Nothing was changed. "
                 "If what you typed after `{name}` was a secret, treat it as exposed: it passed through a command. "
                 "Replace it where it came from, then store the new one with "
                 "`{command} connect {name} set-secret`, which opens a form.")
CONNECT_ROTATE_EXTRA = "`{command} connect {name} rotate` takes nothing more. Nothing was changed."
CONNECTION_NO_WEBHOOKS = "`{name}` does not receive webhooks, so it needs no connection."


def enabled(*, workflow: str, params: dict[str, Any], before: dict[str, Any] | None) -> str:
    """`before`: the parameters of the subscription that was already here, or None for a new one."""
    shown = ", ".join(f"`{escape(k)}={escape(v)}`" for k, v in params.items())
    with_params = f" with {shown}." if shown else " with the workflow's defaults."
    if before is None:
        return f":white_check_mark: `{workflow}` enabled in this channel" + (f" with {shown}." if shown else ".")
    if before == params:
        return f":white_check_mark: `{workflow}` is already enabled in this channel{with_params} Nothing changed."
    return (f":white_check_mark: `{workflow}` updated in this channel: now{with_params} "
            "_Parameters you leave out keep their value; `key=` puts one back to its default._")


# How a setup hint names the connection's secret: shown just above it, or shown once long ago.
SECRET_SHOWN_ABOVE = "the secret above"
SECRET_SHOWN_BEFORE = "the connection's secret (shown when it was created)"


def connection_created(*, integration: str, url: str, secret: str, hint: str, command: str) -> str:
    return (f":link: New *{integration}* connection.\nURL: `{url}`\nSecret: `{secret}`\n"
            f"_The secret is shown this once; store it in {integration} now. "
            f"`{command} connect {integration} rotate` issues a new one._\n{hint}")


def connection_existing(*, integration: str, url: str, hint: str, command: str) -> str:
    return (f":link: *{integration}* connection URL: `{url}`\n_The secret was shown when the connection was "
            f"created; `{command} connect {integration} rotate` issues a new one._\n{hint}")


def connection_tool_secret(*, integration: str, url: str, hint: str, command: str, new: bool) -> str:
    head = f":link: New *{integration}* connection." if new else f":link: *{integration}* connection."
    return (f"{head}\nURL: `{url}`\n{integration} generates the signing secret itself: add the webhook there with "
            f"this URL, then paste its secret with `{command} connect {integration} set-secret`.\n{hint}")


TOOL_SECRET_NO_ROTATE = ("{integration} generates its signing secret itself: rotate it there, then paste the new "
                         "one with `{command} connect {integration} set-secret`.")


def connection_rotated(*, integration: str, url: str, secret: str) -> str:
    return (f":arrows_counterclockwise: New secret for the *{integration}* connection: `{secret}`\n"
            f"URL (unchanged): `{url}`\n_Shown this once; the old secret no longer works._")


def catalog_line(*, name: str, title: str, description: str, triggers: list[str], enabled_here: bool) -> str:
    mark = ":large_green_circle:" if enabled_here else ":white_circle:"
    on = ", ".join(triggers)
    text = f"{mark} `{name}` — {escape(title)} _(on {on})_"
    if description:
        text += f"\n      {escape(description)}"
    return text


EMPTY_CATALOG = "There are no workflows in the catalog yet (add YAML files to the workflows directory)."
LIST_FOOTER = ":large_green_circle: enabled in this channel — `{command} enable <workflow>` to enable one."

UNEXPECTED = "Something went wrong on relaybot's side (reference `{ref}`); an operator can find it in the log."


# ============================================================================================ secrets
# `/relay secret …`, `/relay connect <integration> set-secret`, and `relaybot secrets …`. No text here ever
# contains a secret's value: only its name.

SECRET_USAGE = ("`{command} secret set <NAME>` opens a form to store a secret · `{command} secret list` · "
                "`{command} secret delete <NAME>` (admins). Workflows use a secret as `${{{{ secrets.NAME }}}}`.")
SECRET_BAD_NAME = ("`{name}` cannot be a secret's name: use letters, digits and `_`, not starting with a digit, "
                   "at most {limit} characters (e.g. `DEPLOY_TOKEN`).")
SECRET_NAME_IS_A_CREDENTIAL = ("That looks like a token, not a secret's name: give the secret a name (e.g. "
                               "`GITHUB_TOKEN`) and its value in the form. If it is a real token, consider it "
                               "exposed and revoke it.")
SECRET_NEED_NAME = "Which secret? `{command} secret {sub} <NAME>`."
SECRET_NOT_FOUND = "There is no secret `{name}` in this workspace. `{command} secret list` shows them."
SECRET_DELETED = (":wastebasket: Secret `{name}` deleted. Workflows that use it will fail at that step until it "
                  "is set again.")
SECRET_NONE = "This workspace has no secrets yet. `{command} secret set <NAME>` stores one."
SECRET_NO_TRIGGER = "Slack did not send what is needed to open a form; type the command again."
SECRET_FORM_FAILED = "Slack did not open the form ({error}); type the command again."
SECRET_MANAGE = "manage secrets"
SECRET_SUBMIT_NOT_ADMIN = "Only workspace admins and owners (or the users in RELAYBOT_ADMINS) can store secrets."

SECRET_FORM_TITLE = "Set a secret"
CONNECTION_FORM_TITLE = "Connection secret"
FORM_SUBMIT = "Save"
FORM_CLOSE = "Cancel"
SECRET_FORM_INTRO = ("Stored encrypted for this workspace and never shown again, not even to admins. "
                     "Workflows use it as `${{ secrets.NAME }}`; it is masked as `***` wherever it would appear.")
SECRET_NAME_LABEL = "Name"
SECRET_NAME_HINT = "Letters, digits and _, not starting with a digit. Setting an existing name replaces its value."
SECRET_VALUE_LABEL = "Value"
SECRET_VALUE_HINT = ("Pasted as is, line breaks included. Longer than Slack's 3,000 characters (a large key "
                     "file)? Use relaybot secrets set on the server.")
CONNECTION_FORM_INTRO = ("The signing secret that *{integration}* generated for relaybot's webhook URL "
                         "(for PagerDuty: the secret shown when you add the webhook subscription). "
                         "relaybot verifies every {integration} webhook with it from now on.")
CONNECTION_VALUE_LABEL = "Signing secret"
CONNECTION_VALUE_HINT = "Stored encrypted and never shown again. The previous secret stops working."

SECRET_VALUE_EMPTY = "Enter a value: a secret cannot be empty."
SECRET_VALUE_TOO_LARGE = "This value is {size:,} bytes; a secret can be at most {limit:,} bytes (64 KiB)."
SECRET_VALUE_NOT_TEXT = "A secret must be text (UTF-8)."


def secret_stored(*, name: str, replaced: bool, maskable: bool) -> str:
    verb = "replaced" if replaced else "stored"
    text = (f":lock: Secret `{name}` {verb} (encrypted; the value is not shown again). "
            f"Workflows use it as `${{{{ secrets.{name} }}}}`.")
    if not maskable:
        text += " _It is shorter than 4 characters, so relaybot cannot mask it where a tool echoes it._"
    return text


def secret_line(*, name: str, set_by: str, set_by_name: str | None, set_at: Any) -> str:
    when = f"<!date^{int(set_at.timestamp())}^{{date_short_pretty}} {{time}}|{set_at:%Y-%m-%d %H:%M} UTC>"
    return f"• `{name}` — set by {user(set_by, set_by_name)} {when}"


def secret_list(lines: list[str]) -> str:
    return "*Secrets of this workspace* (values are never shown)\n" + "\n".join(lines)


def connection_secret_stored(*, integration: str, url: str, created: bool) -> str:
    first = "This is a new connection: give" if created else "Give"
    return (f":lock: Signing secret stored for the *{escape(integration)}* connection; webhooks are verified "
            f"with it from now on.\n{first} {escape(integration)} this URL if it does not have it yet: `{url}`")


SECRET_STORE_FAILED = ("relaybot could not store the secret (reference `{ref}`); nothing was changed. "
                       "An operator can find the reference in the log.")
SECRET_VALUE_IN_COMMAND = ("Type only the name: `{command} secret set <NAME>` opens a form for the value, so it "
                           "never passes through a command or a channel. A name is letters, digits and `_`, not "
                           "starting with a digit, at most {limit} characters (e.g. `DEPLOY_TOKEN`). Nothing was "
                           "stored. If what you typed was the real value, treat it as exposed and replace it at its "
                           "source.")
CONNECTION_SET_SECRET_EXTRA = ("`{command} connect {name} set-secret` takes nothing more: it opens a form for the "
                               "secret. Nothing was stored. If what you typed after `set-secret` was the real "
                               "secret, treat it as exposed: replace it in {name}, then paste the new one into the "
                               "form.")
