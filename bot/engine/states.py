"""The states of runs and steps, and which of them are final."""

from __future__ import annotations

# Runs
QUEUED = "queued"
RUNNING = "running"
WAITING = "waiting"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
FINAL_RUN_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE_RUN_STATES = frozenset({QUEUED, RUNNING, WAITING})

# Steps
PENDING = "pending"
APPROVED = "approved"  # decided, about to run
STEP_RUNNING = "running"
STEP_WAITING = "waiting"
STEP_SUCCEEDED = "succeeded"
STEP_FAILED = "failed"
SKIPPED = "skipped"
TIMED_OUT = "timed_out"
STEP_CANCELLED = "cancelled"
# Started, never finished, and its action is not safe to repeat blindly: a person chooses Retry or Skip.
UNKNOWN = "unknown"
FINAL_STEP_STATES = frozenset({STEP_SUCCEEDED, STEP_FAILED, SKIPPED, TIMED_OUT, STEP_CANCELLED})
