"""The Masker: for random secrets in random text, every form a tool may echo a secret in comes out as `***`.

The forms are computed here from the encoders themselves (base64, urllib, json), not from the masker's own
list, so a form the masker forgets fails these properties.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.masking import MASK, MIN_LENGTH, PARTIAL_MIN_LENGTH, LogMasker, MaskedSlackPoster, Masker

# No example database: nothing is written into the working tree.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# Secrets: printable text of every kind, with the characters encoders treat specially well represented.
SPECIAL = "/+=%&?#: \"'\\<>{}[],;\t"
secret_text = st.text(alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                                         st.sampled_from(SPECIAL), st.sampled_from("\n\r")),
                      min_size=MIN_LENGTH, max_size=80).filter(lambda value: len(value.strip()) >= MIN_LENGTH)
surrounding = st.text(max_size=40)
multi_line = st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                              min_size=MIN_LENGTH, max_size=40), min_size=2, max_size=5).map("\n".join).filter(
    # A line of mostly Unicode spaces (U+2028 …) may strip to less than MIN_LENGTH; one line must be long enough.
    lambda value: any(len(line.strip()) >= MIN_LENGTH for line in value.split("\n")))


def secret_only_base64(prefix: bytes, secret: bytes, suffix: bytes, alphabet: str = "standard") -> tuple[str, str]:
    """(the whole encoding, the characters of it that encode bits of `secret` only).

    Character k of a base64 text stands for bits [6k, 6k+6) of the input; the secret's bits are
    [8·len(prefix), 8·(len(prefix)+len(secret))).
    """
    encode = base64.b64encode if alphabet == "standard" else base64.urlsafe_b64encode
    encoded = encode(prefix + secret + suffix).decode()
    first = -(-8 * len(prefix) // 6)
    end = 8 * (len(prefix) + len(secret)) // 6
    return encoded, encoded[first:end]


@PROPERTY
@given(secret=secret_text, left=surrounding, right=surrounding)
def test_the_raw_value_is_masked_anywhere(secret, left, right):
    masked = Masker([secret]).text(left + secret + right)
    assert secret not in masked
    assert MASK in masked


@PROPERTY
@given(secret=multi_line, left=surrounding, right=surrounding, data=st.data())
def test_each_line_of_a_multi_line_value_is_masked_alone(secret, left, right, data):
    line = data.draw(st.sampled_from([line for line in secret.split("\n") if len(line.strip()) >= MIN_LENGTH]))
    masked = Masker([secret]).text(left + line + right)
    assert line.strip() not in masked


@PROPERTY
@given(secret=secret_text, prefix=st.binary(max_size=7), suffix=st.binary(max_size=7), left=surrounding,
       right=surrounding, alphabet=st.sampled_from(["standard", "urlsafe"]))
def test_base64_at_every_offset_is_masked(secret, prefix, suffix, left, right, alphabet):
    encoded, core = secret_only_base64(prefix, secret.encode(), suffix, alphabet)
    assert len(core) >= MIN_LENGTH
    masked = Masker([secret]).text(left + encoded + right)
    assert core not in masked


@PROPERTY
@given(secret=secret_text, left=surrounding, right=surrounding)
def test_base64_of_the_value_with_a_trailing_newline_is_masked(secret, left, right):
    """`echo "$SECRET" | base64`."""
    encoded, core = secret_only_base64(b"", secret.encode(), b"\n")
    masked = Masker([secret]).text(left + encoded + right)
    assert core not in masked
    assert base64.b64decode(encoded) == secret.encode() + b"\n"


def lower_hex(text: str) -> str:
    import re

    return re.sub(r"%[0-9A-F]{2}", lambda match: match.group().lower(), text)


@PROPERTY
@given(secret=secret_text, left=surrounding, right=surrounding,
       encoder=st.sampled_from(["quote", "quote-keep-slash", "quote_plus", "lower-hex", "double"]))
def test_url_encoded_values_are_masked(secret, left, right, encoder):
    encoded = {"quote": lambda: quote(secret, safe=""), "quote-keep-slash": lambda: quote(secret),
               "quote_plus": lambda: quote_plus(secret), "lower-hex": lambda: lower_hex(quote(secret, safe="")),
               "double": lambda: quote(quote(secret, safe=""), safe="")}[encoder]()
    masked = Masker([secret]).text(left + encoded + right)
    assert encoded not in masked


@PROPERTY
@given(secret=secret_text, left=surrounding, right=surrounding, ascii_only=st.booleans())
def test_json_escaped_values_are_masked(secret, left, right, ascii_only):
    escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
    masked = Masker([secret]).text(left + escaped + right)
    assert escaped not in masked
    # Inside a whole JSON document too, and after it is parsed back.
    document = json.dumps({"echo": left + secret + right}, ensure_ascii=ascii_only)
    assert escaped not in Masker([secret]).text(document)
    assert secret not in Masker([secret]).data(json.loads(document))["echo"]


@PROPERTY
@given(secret=secret_text, left=surrounding, right=surrounding)
def test_html_escaped_values_are_masked(secret, left, right):
    escaped = html.escape(secret, quote=False)
    assert escaped not in Masker([secret]).text(left + escaped + right)


@PROPERTY
@given(secret=secret_text.filter(lambda value: len(value) > PARTIAL_MIN_LENGTH), left=surrounding, data=st.data())
def test_a_value_cut_off_at_the_end_of_a_text_is_masked(secret, left, data):
    """Error messages keep the first few hundred characters of an answer; the cut may fall inside a secret."""
    head = secret[:data.draw(st.integers(min_value=PARTIAL_MIN_LENGTH, max_value=len(secret) - 1))]
    masked = Masker([secret]).text(left + head)
    assert not masked.endswith(head)


@PROPERTY
@given(secrets=st.lists(secret_text, min_size=2, max_size=4), data=st.data())
def test_several_values_in_one_text_are_all_masked(secrets, data):
    pieces = [data.draw(surrounding) for _ in range(len(secrets) + 1)]
    text = pieces[0] + "".join(secret + piece for secret, piece in zip(secrets, pieces[1:], strict=True))
    masked = Masker(secrets).text(text)
    for secret in secrets:
        assert secret not in masked


def test_the_strings_inside_a_json_secret_are_masked_one_by_one():
    secret = json.dumps({"type": "service_account",
                         "private_key": "-----BEGIN KEY-----\nAAAAbbbbCCCC\n-----END KEY-----\n",
                         "nested": {"token": "tok_4f9a8b7c"}})
    masker = Masker([secret])
    assert masker.text("the token is tok_4f9a8b7c") == f"the token is {MASK}"
    assert "AAAAbbbbCCCC" not in masker.text("line AAAAbbbbCCCC echoed")
    parsed = masker.data(json.loads(secret))
    assert "tok_4f9a8b7c" not in json.dumps(parsed) and "AAAAbbbbCCCC" not in json.dumps(parsed)
    assert list(parsed) == ["type", "private_key", "nested"], "keys are not secrets"


def test_text_without_secrets_is_left_alone():
    masker = Masker(["s3cr3t-Value/with+chars=="])
    text = "deploy of acme/api #42 succeeded in 3.2 s: HTTP 200 {\"ok\": true} https://example.com/?a=b&c=d"
    assert masker.text(text) == text
    assert masker.data({"status": 200, "items": [1, "two", None]}) == {"status": 200, "items": [1, "two", None]}


def test_overlapping_occurrences_become_one_mask():
    assert Masker(["abab"]).text("xxabababyy") == f"xx{MASK}yy"
    assert Masker(["abcdef", "defghi"]).text("abcdefghi!") == f"{MASK}!"


def test_a_value_containing_the_mask_cannot_survive_masking():
    masker = Masker(["x***"])
    assert "x***" not in masker.text("xx******")


def test_short_values_cannot_be_masked_and_empty_masker_is_a_no_op():
    assert not Masker(["abc"])
    assert Masker().text("abc") == "abc"
    assert Masker().data({"a": "b"}) == {"a": "b"}


def test_a_large_pem_is_masked_in_a_large_text_quickly():
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    masker = Masker([pem])
    text = "noise " * 5000 + base64.b64encode(b"\x00" + pem.encode()).decode() + pem.splitlines()[7]
    started = time.monotonic()
    masked = masker.text(text)
    assert time.monotonic() - started < 2.0
    assert pem.splitlines()[7] not in masked
    assert base64.b64encode(b"\x00" + pem.encode()).decode()[8:-8] not in masked


async def test_a_step_cannot_post_a_secret_to_slack():
    class Recorder:
        def __init__(self) -> None:
            self.posted: list[dict] = []

        async def post_message(self, **arguments):
            self.posted.append(arguments)
            return {"ok": True, "channel": arguments["channel"], "ts": "1.0"}

    recorder = Recorder()
    poster = MaskedSlackPoster(recorder, Masker(["tok_4f9a8b7c"]))
    await poster.post_message(channel="C1", text="token tok_4f9a8b7c", thread_ts="1.0",
                              blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "tok_4f9a8b7c"}}])
    assert recorder.posted == [{"channel": "C1", "text": f"token {MASK}", "thread_ts": "1.0",
                                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": MASK}}]}]


# ------------------------------------------------------------------------------------------------ logs


def test_log_records_are_masked_before_any_handler_sees_them(caplog):
    log_masker = LogMasker()
    log_masker.install()
    log_masker.register("sk_live_51Habcdef")
    logger = logging.getLogger("tests.masking")
    with caplog.at_level(logging.DEBUG):
        logger.warning("calling with %s and %r", "sk_live_51Habcdef", {"token": "sk_live_51Habcdef"})
        try:
            raise ValueError("bad token sk_live_51Habcdef")
        except ValueError:
            logger.exception("failed for %s", quote("sk_live_51Habcdef"))
    assert "sk_live_51Habcdef" not in caplog.text
    assert caplog.text.count(MASK) >= 4
    assert "ValueError: bad token ***" in caplog.text


def test_installing_many_log_maskers_does_not_stack_wrappers():
    first, second = LogMasker(), LogMasker()
    first.install()
    factory = logging.getLogRecordFactory()
    second.install()
    first.install()
    assert logging.getLogRecordFactory() is factory
    first.register("first-secret-1")
    second.register("second-secret-2")
    make_record = logging.getLogRecordFactory()
    record = make_record("x", logging.INFO, __file__, 1, "%s %s", ("first-secret-1", "second-secret-2"), None)
    assert record.getMessage() == f"{MASK} {MASK}"


@pytest.mark.parametrize("value", ["line one secret\nline two secret\n", "tab\tseparated\tsecret"])
def test_whitespace_inside_values_is_kept_in_the_forms(value):
    masker = Masker([value])
    assert value not in masker.text(f"<{value}>")
    assert json.dumps(value)[1:-1] not in masker.text(json.dumps({"v": value}))
