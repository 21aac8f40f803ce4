"""Bad input at scale (hypothesis): never a 500, never a state change without a valid signature.

Runs on the real Redis. Examples share one database per test, so each property is checked
against the state just before its own request.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.keys import Keys
from tests.support.app import post_signed

KEYS = Keys()
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # anything form-encodable
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters=";\x7f"), max_size=40
)
header_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(lambda n: "X-" + n)
sizes = st.one_of(st.just(0), st.integers(0, 2000), st.integers(65000, 70000))  # around MAX_BODY_BYTES
numbers = st.one_of(text, st.from_regex(r"\+1555[0-9]{7}", fullmatch=True))
sids = st.from_regex(r"SM[0-9a-f]{32}", fullmatch=True)
params = st.fixed_dictionaries(
    {},
    optional={
        "From": numbers,
        "To": numbers,
        "MessageSid": st.one_of(text, st.just("SMfixed"), sids),
        "Body": text,
        "NumMedia": text,
    },
).flatmap(lambda fixed: st.dictionaries(text, text, max_size=5).map(lambda extra: {**extra, **fixed}))
phone = st.from_regex(r"\+1555[0-9]{7}", fullmatch=True)
signed_params = st.builds(
    lambda fields, extra, dropped: {k: v for k, v in {**extra, **fields}.items() if k != dropped},
    st.fixed_dictionaries(
        {
            "From": st.one_of(phone, text),
            "To": st.one_of(phone, text),
            "MessageSid": st.one_of(sids, st.just("SMfixed"), text),
        },
        optional={"Body": text, "NumMedia": text},
    ),
    st.dictionaries(text, text, max_size=5),
    st.sampled_from([None, None, None, "From", "To", "MessageSid"]),
)
content_types = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "application/x-www-form-urlencoded; charset=utf-16",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/json",
        "text/plain",
        "application/octet-stream",
        "",
    ]
)


def snapshot(redis_client, form) -> tuple:
    """What a request for this form could change: the keyspace size, the pair's keys."""
    keys = KEYS.conversation(str(form.get("From", "")), str(form.get("To", "")))
    return (
        redis_client.dbsize(),
        redis_client.hgetall(keys.conversation),
        redis_client.exists(keys.lock),
        redis_client.zscore(keys.index_shard, keys.member),
    )


@FUZZ
@given(
    form=params,
    signature=st.one_of(st.none(), header_text),
    cookie=st.one_of(st.none(), header_text),
    headers=st.dictionaries(header_names, header_text, max_size=4),
    size=sizes,
)
def test_unsigned_or_forged_requests_change_nothing(
    app, redis_client, form, signature, cookie, headers, size
):
    form = {**form, "Body": "x" * size} if size else form
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    if cookie is not None:
        headers["Cookie"] = f"sms_session={cookie}"
    response = app.test_client().post("/sms", data=form, headers=headers)
    assert response.status_code in (400, 403, 413)
    assert redis_client.dbsize() == 0


@FUZZ
@given(
    body=st.binary(max_size=3000),
    query=st.binary(max_size=200),
    content_type=content_types,
    signature=st.one_of(st.none(), header_text),
    method=st.sampled_from(["GET", "POST"]),
)
def test_raw_bytes_in_any_encoding_change_nothing(
    app, redis_client, body, query, content_type, signature, method
):
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    response = app.test_client().open(
        "/sms",
        method=method,
        data=body,
        content_type=content_type,
        headers=headers,  # WSGI carries raw query bytes as latin-1
        environ_overrides={"QUERY_STRING": query.decode("latin-1")},
    )
    assert response.status_code in (400, 403, 405, 413)
    assert redis_client.dbsize() == 0


@FUZZ
@given(form=signed_params, cookie=st.one_of(st.none(), header_text), size=sizes)
def test_signed_requests_are_answered_or_refused_never_500(app, redis_client, form, cookie, size):
    form = {**form, "Body": "x" * size} if size else form
    before = snapshot(redis_client, form)
    keys = KEYS.conversation(str(form.get("From", "")), str(form.get("To", "")))
    answered = {field[2:] for field in before[1] if field.startswith("m:")}  # replies kept
    count = int(before[1].get("seq", 0))
    response = post_signed(app.test_client(), form, cookie=cookie)
    event(f"status {response.status_code}")
    assert response.status_code in (200, 400, 413)
    if response.status_code != 200:
        assert snapshot(redis_client, form) == before
        return
    assert response.mimetype == "text/xml"
    expected = count if form["MessageSid"] in answered else count + 1  # a redelivery counts once
    assert int(redis_client.hget(keys.conversation, "seq")) == expected
