"""`slack.post`: post a message to any channel the bot may post in, or into the run's thread."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from integrations.base import Action, ActionContext, ActionFailed, ActionInput, ActionOutput


class PostInput(ActionInput):
    text: str = Field(description="the message text (mrkdwn); the notification text when blocks are given")
    blocks: list[dict[str, Any]] | None = Field(default=None, description="Block Kit blocks")
    channel: str | None = Field(default=None, description="a channel id; defaults to the run's channel")
    thread: bool = Field(default=False, description="reply in the run's thread")

    @model_validator(mode="after")
    def _thread_needs_run_channel(self) -> PostInput:
        if not self.text.strip():
            raise ValueError("text must not be empty")
        return self


class PostOutput(ActionOutput):
    channel: str
    ts: str


class Post(Action[PostInput, PostOutput]):
    name: ClassVar[str] = "slack.post"
    description: ClassVar[str] = "Post a message to a channel, or into the run's thread."
    Input = PostInput
    Output = PostOutput

    async def run(self, inputs: PostInput, ctx: ActionContext) -> PostOutput:
        if ctx.slack is None:
            raise ActionFailed("Slack is not available here", retryable=False)
        channel = inputs.channel or ctx.channel
        if not channel:
            raise ActionFailed("no channel: give `channel:`", retryable=False)
        thread_ts = None
        if inputs.thread:
            if channel != ctx.channel:
                raise ActionFailed("`thread: true` replies in the run's own channel; drop `channel:`",
                                   retryable=False)
            thread_ts = ctx.thread_ts
        result = await ctx.slack.post_message(channel=channel, text=inputs.text, blocks=inputs.blocks,
                                              thread_ts=thread_ts)
        return PostOutput(channel=result.get("channel", channel), ts=result["ts"])
