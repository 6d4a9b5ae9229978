"""Envelope encryption: master keys, sealing bound to workspace and name, tampering, rotation (also killed)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from bot.cli import main as cli_main
from bot.crypto import (
    HEADER_BYTES,
    NONCE_BYTES,
    Keyring,
    MasterKey,
    generate_master_key_text,
    key_usage,
    load_master_keys,
    rotate_data_keys,
    secret_purpose,
)
from bot.errors import ConfigError, DecryptionError
from bot.store import migrate
from bot.store.db import Database
from bot.store.models import DataKey, Secret

OLD_KEY = base64.b64encode(b"o" * 32).decode()
NEW_KEY = base64.b64encode(b"n" * 32).decode()


def keyring(*texts: str) -> Keyring:
    return Keyring([MasterKey.from_text(text) for text in texts])


@pytest.fixture
async def db(tmp_path: Path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'crypto.db'}")
    await migrate.upgrade(database)
    yield database
    await database.dispose()


async def seal(db: Database, ring: Keyring, team_id: str, name: str, value: str) -> bytes:
    from datetime import UTC, datetime

    async with db.write() as session:
        sealed = await ring.seal(session, team_id=team_id, purpose=secret_purpose(name), plaintext=value.encode())
        await session.merge(Secret(team_id=team_id, name=name, ciphertext=sealed, set_by="U1", set_by_name=None,
                                   set_at=datetime.now(UTC)))
    return sealed


async def open_row(db: Database, ring: Keyring, team_id: str, name: str) -> str:
    async with db.read() as session:
        row = await session.get(Secret, (team_id, name))
        assert row is not None
        return (await ring.open(session, team_id=team_id, purpose=secret_purpose(name),
                                sealed=row.ciphertext)).decode()


# ------------------------------------------------------------------------------------------------ master keys


def test_master_keys_from_the_environment_are_newest_first():
    keys = load_master_keys(keys=[NEW_KEY, OLD_KEY], key_file=None, default_file=Path("/nonexistent/relaybot.key"))
    assert [key.key for key in keys] == [b"n" * 32, b"o" * 32]
    assert keys[0].id != keys[1].id and len(keys[0].id) == 16


@pytest.mark.parametrize(("text", "problem"), [("not base64!", "not valid base64"),
                                               (base64.b64encode(b"short").decode(), "must be 32 bytes")])
def test_a_bad_master_key_is_a_configuration_error_that_names_the_variable(text, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        load_master_keys(keys=[text], key_file=None, default_file=Path("/nonexistent"))
    assert "RELAYBOT_MASTER_KEYS" in str(caught.value)


def test_a_master_key_never_shows_in_its_repr():
    key = MasterKey.from_text(NEW_KEY)
    assert "nnnn" not in repr(key) and NEW_KEY not in repr(key) and str(b"n" * 32) not in repr(key)


def test_without_configuration_a_key_file_is_generated_0600_with_a_warning(tmp_path, caplog):
    path = tmp_path / "state" / "relaybot.key"
    with caplog.at_level(logging.WARNING, logger="bot.crypto"):
        first = load_master_keys(keys=[], key_file=None, default_file=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert any("generated one into" in record.getMessage() and str(path) in record.getMessage()
               for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bot.crypto"):
        again = load_master_keys(keys=[], key_file=None, default_file=path)
    assert again == first and len(first) == 1
    assert not caplog.records, "a second start reads the key quietly"
    assert [p.name for p in path.parent.iterdir()] == ["relaybot.key"], "no temporary file is left behind"


def test_the_command_line_never_generates_a_key(tmp_path):
    with pytest.raises(ConfigError, match="no master key"):
        load_master_keys(keys=[], key_file=None, default_file=tmp_path / "relaybot.key", generate=False)
    assert not (tmp_path / "relaybot.key").exists()


def test_a_key_file_is_read_newest_first_and_must_exist(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(f"# rotated in March\n{NEW_KEY}\n\n{OLD_KEY}\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="bot.crypto"):
        keys = load_master_keys(keys=[], key_file=path, default_file=tmp_path / "unused")
    assert [key.key for key in keys] == [b"n" * 32, b"o" * 32]
    assert any("can be read by other users" in record.getMessage() for record in caplog.records)
    with pytest.raises(ConfigError, match=r"RELAYBOT_MASTER_KEY_FILE.*does not exist"):
        load_master_keys(keys=[], key_file=tmp_path / "missing", default_file=tmp_path / "unused")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_master_keys(keys=[], key_file=empty, default_file=tmp_path / "unused")


def test_keys_generate_prints_a_usable_key(capsys, monkeypatch):
    monkeypatch.delenv("RELAYBOT_MASTER_KEYS", raising=False)
    assert cli_main(["keys", "generate"]) == 0
    out, err = capsys.readouterr()
    key = MasterKey.from_text(out.strip())
    assert key.id in err and "relaybot keys rotate" in err
    assert out.strip() != generate_master_key_text()


# ------------------------------------------------------------------------------------------------ sealing


async def test_a_value_opens_only_for_its_workspace_and_name(db):
    ring = keyring(NEW_KEY)
    sealed = await seal(db, ring, "T1", "TOKEN", "hunter2-value")
    assert b"hunter2-value" not in sealed
    assert await open_row(db, ring, "T1", "TOKEN") == "hunter2-value"
    async with db.read() as session:
        with pytest.raises(DecryptionError, match="failed authentication"):
            await ring.open(session, team_id="T1", purpose=secret_purpose("OTHER"), sealed=sealed)
        await seal(db, ring, "T2", "TOKEN", "something else")
        with pytest.raises(DecryptionError):
            await ring.open(session, team_id="T2", purpose=secret_purpose("TOKEN"), sealed=sealed)
        with pytest.raises(DecryptionError, match="has no data key"):
            await ring.open(session, team_id="T3", purpose=secret_purpose("TOKEN"), sealed=sealed)


async def test_every_single_changed_byte_fails_loudly(db):
    ring = keyring(NEW_KEY)
    sealed = await seal(db, ring, "T1", "TOKEN", "a value worth protecting")
    async with db.read() as session:
        for position in range(len(sealed)):
            tampered = bytearray(sealed)
            tampered[position] ^= 0x01
            with pytest.raises(DecryptionError):
                await ring.open(session, team_id="T1", purpose=secret_purpose("TOKEN"), sealed=bytes(tampered))
        with pytest.raises(DecryptionError, match="not a relaybot ciphertext"):
            await ring.open(session, team_id="T1", purpose=secret_purpose("TOKEN"), sealed=sealed[:20])


async def test_tampered_rows_in_the_database_fail_loudly(db):
    ring = keyring(NEW_KEY)
    await seal(db, ring, "T1", "ALPHA", "alpha-value")
    await seal(db, ring, "T1", "BRAVO", "bravo-value")
    await seal(db, ring, "T2", "ALPHA", "t2-alpha-value")

    async def ciphertext(team_id: str, name: str) -> bytes:
        async with db.read() as session:
            row = await session.get(Secret, (team_id, name))
            assert row is not None
            return row.ciphertext

    async def store(team_id: str, name: str, value: bytes) -> None:
        async with db.write() as session:
            await session.execute(update(Secret).where(Secret.team_id == team_id, Secret.name == name)
                                  .values(ciphertext=value))

    alpha, bravo, t2_alpha = await ciphertext("T1", "ALPHA"), await ciphertext("T1", "BRAVO"), await ciphertext(
        "T2", "ALPHA")
    # Two rows swapped: each is bound to its own name.
    await store("T1", "ALPHA", bravo)
    await store("T1", "BRAVO", alpha)
    for name in ("ALPHA", "BRAVO"):
        with pytest.raises(DecryptionError, match=f"secret:{name}: ciphertext failed authentication"):
            await open_row(db, ring, "T1", name)
    # A row copied from another workspace names another data key.
    await store("T1", "ALPHA", t2_alpha)
    with pytest.raises(DecryptionError, match="sealed under data key"):
        await open_row(db, ring, "T1", "ALPHA")
    # The key id in the header changed: refused before any decryption is tried.
    changed = bytearray(alpha)
    changed[1:HEADER_BYTES] = os.urandom(HEADER_BYTES - 1)
    await store("T1", "ALPHA", bytes(changed))
    with pytest.raises(DecryptionError, match="sealed under data key"):
        await open_row(db, ring, "T1", "ALPHA")
    # Put back as it was, it opens again (the failures above were about the rows, not the keyring).
    await store("T1", "ALPHA", alpha)
    await store("T1", "BRAVO", bravo)
    assert await open_row(db, ring, "T1", "ALPHA") == "alpha-value"
    assert await open_row(db, ring, "T1", "BRAVO") == "bravo-value"


async def test_tampered_data_keys_fail_loudly(db):
    ring = keyring(NEW_KEY)
    await seal(db, ring, "T1", "ALPHA", "alpha-value")
    await seal(db, ring, "T2", "ALPHA", "t2-alpha-value")
    async with db.read() as session:
        rows = {row.team_id: (row.wrapped_key, row.master_key_id)
                for row in (await session.execute(select(DataKey))).scalars()}
    # Wrapped data keys swapped between workspaces: each is bound to its workspace (a fresh process reads them).
    async with db.write() as session:
        await session.execute(update(DataKey).where(DataKey.team_id == "T1").values(wrapped_key=rows["T2"][0]))
    with pytest.raises(DecryptionError, match="data key of workspace T1 failed authentication"):
        await open_row(db, keyring(NEW_KEY), "T1", "ALPHA")
    # One flipped bit in a wrapped key.
    flipped = bytearray(rows["T1"][0])
    flipped[NONCE_BYTES + 3] ^= 0x80
    async with db.write() as session:
        await session.execute(update(DataKey).where(DataKey.team_id == "T1").values(wrapped_key=bytes(flipped)))
    with pytest.raises(DecryptionError, match="failed authentication"):
        await open_row(db, keyring(NEW_KEY), "T1", "ALPHA")
    # A master key that is not configured is named.
    async with db.write() as session:
        await session.execute(update(DataKey).where(DataKey.team_id == "T1").values(
            wrapped_key=rows["T1"][0], master_key_id="0123456789abcdef"))
    with pytest.raises(DecryptionError, match="master key 0123456789abcdef, which is not configured"):
        await open_row(db, keyring(NEW_KEY), "T1", "ALPHA")
    # The running keyring still has the data key it unwrapped before: it keeps working.
    assert await open_row(db, ring, "T1", "ALPHA") == "alpha-value"


async def test_a_rolled_back_transaction_does_not_leave_an_unstored_data_key_in_use(db):
    """The data key created inside a transaction that fails must not be used by the next seal of the process:
    its row was never stored, so nothing sealed with it could be read by another process or after a restart."""
    ring = keyring(NEW_KEY)
    with pytest.raises(RuntimeError):
        async with db.write() as session:
            await ring.seal(session, team_id="T1", purpose=secret_purpose("A"), plaintext=b"first")
            raise RuntimeError("something after the seal failed")
    await seal(db, ring, "T1", "A", "second")
    assert await open_row(db, keyring(NEW_KEY), "T1", "A") == "second"


async def test_two_processes_share_one_data_key_per_workspace(db):
    first, second = keyring(NEW_KEY), keyring(NEW_KEY)
    await seal(db, first, "T1", "A", "from the first")
    await seal(db, second, "T1", "B", "from the second")
    async with db.read() as session:
        assert (await session.execute(select(DataKey))).scalars().all().__len__() == 1
    assert await open_row(db, first, "T1", "B") == "from the second"
    assert await open_row(db, second, "T1", "A") == "from the first"


# ------------------------------------------------------------------------------------------------ rotation


async def populate(db: Database, teams: int, *, key: str = OLD_KEY) -> dict[tuple[str, str], str]:
    """`teams` workspaces with a data key under `key`, and a secret in every tenth."""
    ring = keyring(key)
    values: dict[tuple[str, str], str] = {}
    async with db.write() as session:
        for number in range(teams):
            team_id = f"T{number:05d}"
            sealed = await ring.seal(session, team_id=team_id, purpose=secret_purpose("TOKEN"),
                                     plaintext=f"token of {team_id}".encode())
            if number % 10 == 0:
                from datetime import UTC, datetime

                session.add(Secret(team_id=team_id, name="TOKEN", ciphertext=sealed, set_by="U1", set_by_name=None,
                                   set_at=datetime.now(UTC)))
                values[(team_id, "TOKEN")] = f"token of {team_id}"
    return values


async def usage(db: Database) -> dict[str, int]:
    async with db.read() as session:
        return await key_usage(session)


async def test_rotation_stopped_half_way_and_run_again_ends_with_every_row_on_the_new_key(db):
    values = await populate(db, 25)
    old_id, new_id = MasterKey.from_text(OLD_KEY).id, MasterKey.from_text(NEW_KEY).id
    both = keyring(NEW_KEY, OLD_KEY)
    # A bot with both keys has already opened some values: its cached data keys must stay right.
    running = keyring(NEW_KEY, OLD_KEY)
    assert await open_row(db, running, "T00000", "TOKEN") == "token of T00000"

    first = await rotate_data_keys(db, both, limit=10, batch=4)
    assert (first.rewrapped, first.remaining, first.failed) == (10, 15, {})
    assert await usage(db) == {new_id: 10, old_id: 15}
    for (team_id, name), value in values.items():  # half-way: everything readable with both keys
        assert await open_row(db, keyring(NEW_KEY, OLD_KEY), team_id, name) == value

    second = await rotate_data_keys(db, both)
    assert (second.rewrapped, second.remaining) == (15, 0)
    assert await usage(db) == {new_id: 25}
    assert (await rotate_data_keys(db, both)).rewrapped == 0, "a finished rotation has nothing left to do"
    only_new = keyring(NEW_KEY)
    for (team_id, name), value in values.items():
        assert await open_row(db, only_new, team_id, name) == value
        assert await open_row(db, running, team_id, name) == value
    # Each re-wrap is in its workspace's audit log (key ids only), and every chain still verifies.
    from bot import audit
    from bot.store.models import AuditHead, AuditRecord

    async with db.read() as session:
        records = list((await session.execute(select(AuditRecord).where(AuditRecord.action == "keys.rotated")))
                       .scalars())
        heads = {head.team_id: {"seq": head.seq, "hash": head.hash}
                 for head in (await session.execute(select(AuditHead))).scalars()}
        for team_id in heads:
            chain = [audit.record_fields(r) async for r in audit.iter_records(session, team_id=team_id)]
            assert audit.verify_chain(team_id, chain, heads[team_id]) is None
    assert len(records) == 25 and {r.details["to_master_key"] for r in records} == {new_id}
    assert all(r.details["from_master_key"] == old_id for r in records)
    async with db.read() as session:
        assert all(row.rewrapped_at is not None for row in (await session.execute(select(DataKey))).scalars())


async def test_rotation_reports_a_data_key_it_cannot_unwrap_and_goes_on(db):
    await populate(db, 3)
    stranger = base64.b64encode(b"s" * 32).decode()
    await populate_one(db, "T-STRANGER", stranger)
    rotation = await rotate_data_keys(db, keyring(NEW_KEY, OLD_KEY))
    assert rotation.rewrapped == 3 and rotation.remaining == 1
    assert list(rotation.failed) == ["T-STRANGER"] and "not configured" in rotation.failed["T-STRANGER"]


async def populate_one(db: Database, team_id: str, key: str) -> None:
    async with db.write() as session:
        await keyring(key).seal(session, team_id=team_id, purpose="secret:X", plaintext=b"x")


def run_cli(tmp_path: Path, *args: str, keys: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLACK_", "RELAYBOT_"))}
    env.update({"RELAYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'crypto.db'}",
                "RELAYBOT_MASTER_KEYS": keys})
    return subprocess.run([sys.executable, "-m", "bot", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)


def count_on(database: Path, master_key_id: str) -> int:
    with sqlite3.connect(database, timeout=30) as connection:
        return connection.execute("SELECT count(*) FROM data_keys WHERE master_key_id = ?",
                                  (master_key_id,)).fetchone()[0]


async def test_rotation_killed_half_way_then_run_again_finishes(db, tmp_path):
    """`relaybot keys rotate` killed with SIGKILL part-way through, then run again, leaves every workspace on
    the new key and every value readable with the new key alone."""
    teams = 1500
    values = await populate(db, teams)
    new_id, old_id = MasterKey.from_text(NEW_KEY).id, MasterKey.from_text(OLD_KEY).id
    database = tmp_path / "crypto.db"
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLACK_", "RELAYBOT_"))}
    env.update({"RELAYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
                "RELAYBOT_MASTER_KEYS": f"{NEW_KEY},{OLD_KEY}"})
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "keys", "rotate", env=env,
                                                   cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(count_on, database, new_id) < 20:
        assert process.returncode is None, "the rotation ended before it could be interrupted"
        assert time.monotonic() < deadline, "the rotation did not start"
        await asyncio.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert process.returncode == -signal.SIGKILL
    done = await asyncio.to_thread(count_on, database, new_id)
    assert 20 <= done < teams, "killed part-way"
    assert done + await asyncio.to_thread(count_on, database, old_id) == teams, "no workspace lost its data key"

    result = await asyncio.to_thread(run_cli, tmp_path, "keys", "rotate", keys=f"{NEW_KEY},{OLD_KEY}")
    assert result.returncode == 0, result.stderr
    assert f"re-wrapped {teams - done} workspace data key(s)" in result.stdout and "0 remain" in result.stdout
    assert await usage(db) == {new_id: teams}
    only_new = keyring(NEW_KEY)
    for (team_id, name), value in values.items():
        assert await open_row(db, only_new, team_id, name) == value

    status = await asyncio.to_thread(run_cli, tmp_path, "keys", "status", keys=f"{NEW_KEY},{OLD_KEY}")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any(line.startswith(new_id) and f"{teams}" in line and "newest" in line for line in lines)
    assert any(line.startswith(old_id) and " 0 " in line and "can be removed" in line for line in lines)


async def test_keys_status_names_a_master_key_that_is_not_configured(db, tmp_path):
    await populate(db, 2)
    result = await asyncio.to_thread(run_cli, tmp_path, "keys", "status", keys=NEW_KEY)
    assert result.returncode == 1
    old_id = MasterKey.from_text(OLD_KEY).id
    assert any(line.startswith(old_id) and "NOT CONFIGURED" in line for line in result.stdout.splitlines())
    assert "not configured" in result.stderr
    limited = await asyncio.to_thread(run_cli, tmp_path, "keys", "rotate", "--limit", "1", keys=f"{NEW_KEY},{OLD_KEY}")
    assert limited.returncode == 0 and "1 remain" in limited.stdout and "again" in limited.stdout


async def test_the_database_holds_no_plaintext(db, tmp_path):
    await seal(db, keyring(NEW_KEY), "T1", "A", "plain-canary-8c1f")
    async with db.read() as session:
        rows = (await session.execute(text("SELECT * FROM secrets"))).all()
    assert rows
    with sqlite3.connect(tmp_path / "crypto.db") as connection:
        dump = "\n".join(connection.iterdump())
    assert "plain-canary-8c1f" not in dump and b"plain-canary-8c1f".hex() not in dump
