"""The run card's text: event data stays data, the source link included."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bot.slack import messages
from bot.slack.blocks import run_card
from bot.store.models import Run


def card_of(**card: object) -> str:
    run = Run(id="R1", workflow="deploy", state="succeeded", card={"title": "Deploy", **card})
    _, blocks = run_card(run, [])
    return blocks[1]["text"]["text"]


def test_a_link_cannot_close_itself_and_ping_the_channel() -> None:
    text = card_of(summary="deploy done",
                   link="https://ok.example> <!channel> urgent: <https://evil.example/login")
    assert "<!channel>" not in text and text.count("<") == 1 and text.count(">") == 1
    assert text == ("<https://ok.example%3E%20%3C!channel%3E%20urgent:%20%3Chttps://evil.example/login"
                    "|deploy done>")


def test_only_http_links_are_links() -> None:
    assert card_of(summary="x", link="javascript:alert(1)") == "x"
    assert card_of(summary="x", link="slack://open") == "x"
    assert card_of(summary="a <b>", link=None) == "a &lt;b&gt;"
    assert (card_of(summary="", link="https://example.com/a?b=1&c=2")
            == "<https://example.com/a?b=1&amp;c=2|open the source>")
    assert card_of(summary="x", link="https://example.com/" + "a" * messages.MAX_LINK) == "x"


@given(st.text())
def test_a_link_target_never_holds_what_ends_a_link(tail: str) -> None:
    target = messages.link_target("https://example.com/" + tail)
    if target is None:  # only when too long
        assert len(("https://example.com/" + tail).strip()) > messages.MAX_LINK
        return
    assert not any(char in target for char in "<>|") and not any(char.isspace() for char in target)
    assert target.replace("&amp;", "").count("&") == 0


def test_the_first_reply_names_the_trigger_with_the_right_article() -> None:
    def origin(source: str) -> str:
        return messages.thread_run_started(run_id="R1", kind="alert.firing", source=source, delivery=None,
                                           started_by=None, workflow="w")

    assert "started by an alertmanager event `alert.firing`" in origin("alertmanager")
    assert "started by a github event" in origin("github")
