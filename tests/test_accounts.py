"""Signing keys as accounts have them: several auth tokens at once, tokens per AccountSid,
SharedKey secrets by key id; their settings refused at start without naming a secret."""

from __future__ import annotations

import json
import logging

import pytest

from service import create_app
from service.accounts import Accounts, Secret
from service.settings import ConfigError, load
from service.simulator import TwilioSimulator
from service.wiring import current
from tests.support.app import make_app, sign, webhook_params
from tests.support.numbers import OURS, REY
from tests.support.prometheus import scrape

URL = "http://localhost/sms"
ALICE, BOB, CAROL = "AC" + "a1" * 16, "AC" + "b2" * 16, "AC" + "c3" * 16
SHARED = "X-Twilio-Webhooks-Signature-Settings"


def accounts_json(**accounts) -> str:
    return json.dumps(accounts)


TWO_ACCOUNTS = json.dumps(
    {
        ALICE: {"auth_tokens": ["alice-new", "alice-old"]},
        BOB: {"auth_tokens": ["bob-token"], "shared_keys": {"webhooks_sharedkey_1": "bob-shared-secret"}},
    }
)
SECRETS = ("alice-new", "alice-old", "bob-token", "bob-shared-secret")


def post(app, params, token, *, url=URL, **headers):
    """``params`` signed with ``token`` (HMAC-SHA1, or the algorithm a settings header names)."""
    algorithm = None
    if SHARED in headers:
        algorithm = headers[SHARED].rpartition("algorithm=")[2] or None
    headers["X-Twilio-Signature"] = sign(url, params, token, algorithm)
    return app.test_client().post(url.removeprefix("http://localhost"), data=params, headers=headers)


def key_counts(app) -> dict[str, float]:
    samples = scrape(app.test_client().get("/metrics").get_data(as_text=True))
    return {k: v for k, v in samples.items() if k.startswith("sms_signature_key_total")}


@pytest.fixture
def summaries(caplog):
    caplog.set_level(logging.INFO)

    def take():
        taken = [r.fields for r in caplog.records if r.name == "service.webhook"]
        caplog.clear()
        return taken

    return take


# Several tokens for one account (TWILIO_AUTH_TOKEN).


def test_every_listed_token_is_accepted_and_counted_by_its_position(fake_app):
    app = make_app(TWILIO_AUTH_TOKEN="new-token, old-token")
    assert post(app, webhook_params(), "new-token").status_code == 200
    assert post(app, webhook_params(), "old-token").status_code == 200
    assert post(app, webhook_params(), "old-token").status_code == 200
    assert post(app, webhook_params(), "other-token").status_code == 403
    assert post(app, webhook_params(), "new-token, old-token").status_code == 403  # the setting itself
    assert key_counts(app) == {
        "sms_signature_key_total{key=primary}": 1.0,
        "sms_signature_key_total{key=secondary}": 2.0,
    }


@pytest.mark.parametrize(
    "value, problem",
    [
        ("a,,b", "an auth token is empty"),
        ("a,b,c,d,e", "expected 1 to 4 auth tokens"),
        ("same, same", "an auth token is listed twice"),
    ],
)
def test_a_malformed_token_list_is_refused_without_showing_it(value, problem):
    with pytest.raises(ConfigError) as refused:
        load({"TWILIO_AUTH_TOKEN": value})
    assert str(refused.value).startswith("TWILIO_AUTH_TOKEN: ")
    assert problem in str(refused.value)
    assert "same" not in str(refused.value)
    assert "a,b" not in str(refused.value)


# Tokens per AccountSid (TWILIO_ACCOUNTS).


def accounts_app(redis_url=None, value=TWO_ACCOUNTS, **settings):
    return make_app(TWILIO_AUTH_TOKEN=None, TWILIO_ACCOUNTS=value, REDIS_URL=redis_url, **settings)


def test_the_request_s_account_chooses_the_tokens_tried(redis_url, redis_client, summaries):
    app = accounts_app(redis_url)
    summaries()
    assert post(app, webhook_params(AccountSid=ALICE), "alice-new").status_code == 200
    assert "signature_key" not in summaries()[0]  # the usual key goes unnamed
    assert post(app, webhook_params(AccountSid=ALICE), "alice-old").status_code == 200
    [line] = summaries()
    assert (line["signature_key"], line["account_sid"]) == ("secondary", ALICE)  # which account still uses it
    assert post(app, webhook_params(AccountSid=BOB), "bob-token").status_code == 200
    keys_before = redis_client.dbsize()
    # Another account's token, however valid there, signs nothing here.
    assert post(app, webhook_params(AccountSid=ALICE), "bob-token").status_code == 403
    assert post(app, webhook_params(AccountSid=BOB), "alice-new").status_code == 403
    assert redis_client.dbsize() == keys_before
    assert key_counts(app) == {
        "sms_signature_key_total{key=primary}": 2.0,
        "sms_signature_key_total{key=secondary}": 1.0,
        "sms_signature_key_total{key=webhooks_sharedkey_1}": 0.0,
    }


def test_status_callbacks_are_checked_with_the_same_accounts_tokens(redis_url):
    """Twilio signs a message's status callbacks as it signs its webhooks, with the sending
    account's token: /sms/status accepts what /sms accepts, per account, and nothing else. (A
    callback for a message the service does not hold is a 404, past the signature check.)"""
    app = accounts_app(redis_url)
    url = f"http://localhost/sms/status?m=x|{REY}|{OURS}"

    def status(account, token):
        form = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered", "AccountSid": account}
        return post(app, form, token, url=url).status_code

    assert status(ALICE, "alice-new") == 404
    assert status(ALICE, "alice-old") == 404  # a rotation's older token, as for messages
    assert status(BOB, "bob-token") == 404
    assert status(ALICE, "bob-token") == 403
    assert status(CAROL, "alice-new") == 403


def test_an_unknown_account_is_refused_and_named_in_the_line(summaries):
    app = accounts_app()
    summaries()
    signed_with_a_listed_token = post(app, webhook_params(AccountSid=CAROL), "alice-new")
    assert signed_with_a_listed_token.status_code == 403
    [line] = summaries()
    assert (line["status"], line["reason"]) == (403, f"unknown AccountSid {CAROL}")
    for sid in (None, "AC123", "not an account\n"):
        params = webhook_params() if sid is None else webhook_params(AccountSid=sid)
        assert post(app, params, "alice-new").status_code == 403
        [line] = summaries()
        assert line["reason"] == "missing or malformed AccountSid"


def test_accounts_from_a_file(tmp_path, redis_url):
    """A thousand accounts in a file, each answering with its own token."""
    sids = [f"AC{n:032x}" for n in range(1000)]
    path = tmp_path / "accounts.json"
    path.write_text(json.dumps({sid: {"auth_tokens": [f"token-{n}"]} for n, sid in enumerate(sids)}))
    app = accounts_app(redis_url, value=str(path))
    for n in (0, 500, 999):
        assert post(app, webhook_params(AccountSid=sids[n]), f"token-{n}").status_code == 200
        assert post(app, webhook_params(AccountSid=sids[n]), f"token-{n + 1}").status_code == 403
    assert current(app).accounts.auth_token(sids[7]) == "token-7"


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"AC', "not JSON: Unterminated string starting at (line 1, column 2)"),
        ("[]", "expected a JSON object of accounts by AccountSid"),
        (json.dumps({"not-a-sid": {"auth_tokens": ["alice-new"]}}), "entry 1: its name is not an AccountSid"),
        (json.dumps({ALICE: ["alice-new"]}), f'{ALICE}: expected {{"auth_tokens"'),
        (json.dumps({ALICE: {"auth_tokens": []}}), f"{ALICE}: expected 1 to 4 auth tokens"),
        (json.dumps({ALICE: {"auth_tokens": ["alice-new", "alice-new"]}}), "listed twice"),
        (json.dumps({ALICE: {"auth_tokens": "alice-new"}}), "auth_tokens must be a list of strings"),
        (json.dumps({ALICE: {"shared_keys": {"a key": "alice-new"}}}), "a shared key id is not"),
        (json.dumps({ALICE: {"shared_keys": {"k": ""}}}), "shared_keys must map key ids to non-empty"),
    ],
)
def test_a_malformed_accounts_file_is_refused_in_one_line_without_its_secrets(tmp_path, content, problem):
    path = tmp_path / "accounts.json"
    path.write_text(content)
    for value, where in ((str(path), f"TWILIO_ACCOUNTS: {path}: "), (content, "TWILIO_ACCOUNTS: ")):
        if not content.startswith("{") and value == content:
            continue  # inline, only a JSON object is read as one
        with pytest.raises(ConfigError) as refused:
            load({"TWILIO_ACCOUNTS": value})
        message = str(refused.value)
        assert message.startswith(where)
        assert problem in message
        assert "\n" not in message
        assert "alice-new" not in message


def test_an_unreadable_accounts_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load({"TWILIO_ACCOUNTS": str(tmp_path / "missing.json")})
    missing = tmp_path / "missing.json"
    assert str(refused.value) == f"TWILIO_ACCOUNTS: {missing}: cannot be read: No such file or directory"


def test_both_settings_at_once_are_refused():
    with pytest.raises(ConfigError, match="^TWILIO_AUTH_TOKEN and TWILIO_ACCOUNTS are both set"):
        create_app({"TWILIO_AUTH_TOKEN": "t", "TWILIO_ACCOUNTS": TWO_ACCOUNTS})


def test_production_starts_with_accounts_alone(monkeypatch):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("TWILIO_ACCOUNTS", TWO_ACCOUNTS)
    assert create_app().config["APP_ENV"] == "production"
    monkeypatch.delenv("TWILIO_ACCOUNTS")
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN is not set"):
        create_app()


# SharedKey signatures: their own secret, chosen by the header's key id, with its algorithm.


@pytest.mark.parametrize("algorithm", ["HMAC_SHA256", "HMAC_SHA1"])
def test_a_shared_key_signature_is_checked_with_its_secret(algorithm):
    app = accounts_app()
    settings = {SHARED: f"key=webhooks_sharedkey_1,algorithm={algorithm}"}
    assert post(app, webhook_params(AccountSid=BOB), "bob-shared-secret", **settings).status_code == 200
    # The account's auth token does not sign SharedKey requests, nor the secret plain ones.
    assert post(app, webhook_params(AccountSid=BOB), "bob-token", **settings).status_code == 403
    assert post(app, webhook_params(AccountSid=BOB), "bob-shared-secret").status_code == 403
    assert key_counts(app)["sms_signature_key_total{key=webhooks_sharedkey_1}"] == 1.0


def test_a_shared_key_is_its_account_s_own(summaries):
    app = accounts_app()
    summaries()
    settings = {SHARED: "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    assert post(app, webhook_params(AccountSid=ALICE), "bob-shared-secret", **settings).status_code == 403
    assert summaries()[0]["reason"] == "unknown SharedKey id webhooks_sharedkey_1"
    settings = {SHARED: "key=webhooks_sharedkey_2,algorithm=HMAC_SHA256"}
    assert post(app, webhook_params(AccountSid=BOB), "bob-shared-secret", **settings).status_code == 403
    assert summaries()[0]["reason"] == "unknown SharedKey id webhooks_sharedkey_2"
    settings = {SHARED: "key=a key\u2028,algorithm=HMAC_SHA256"}
    assert post(app, webhook_params(AccountSid=BOB), "bob-shared-secret", **settings).status_code == 403
    assert summaries()[0]["reason"] == "malformed key id in X-Twilio-Webhooks-Signature-Settings"


def test_a_shared_key_request_is_refused_where_only_an_auth_token_is_set():
    """With TWILIO_AUTH_TOKEN alone no key id is known: a SharedKey request is refused, even
    signed with the auth token (validating it with the token was the bug of issue 27)."""
    app = make_app(TWILIO_AUTH_TOKEN="the-token")
    settings = {SHARED: "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    assert post(app, webhook_params(), "the-token", **settings).status_code == 403
    assert post(app, webhook_params(), "the-token", **{SHARED: "algorithm=HMAC_SHA1"}).status_code == 200


# Secrets stay secret; the API the outbound sender calls.


def test_no_secret_in_logs_metrics_or_answers(caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    app = accounts_app(OPS_TOKEN="ops")
    answers = []
    for sid, token in ((ALICE, "alice-old"), (BOB, "bob-token"), (CAROL, "alice-new"), (ALICE, "wrong")):
        answers.append(post(app, webhook_params(AccountSid=sid), token).get_data(as_text=True))
    answers.append(app.test_client().get("/metrics").get_data(as_text=True))
    ops = app.test_client().get("/ops/conversations", headers={"Authorization": "Bearer ops"})
    assert ops.status_code == 200
    answers.append(ops.get_data(as_text=True))
    written = "\n".join([*answers, caplog.text, repr(current(app).accounts.account(BOB))])
    for secret in SECRETS:
        assert secret not in written
    assert repr(Secret("primary", "alice-new")) == "Secret('primary')"


def test_the_sender_s_api_gives_each_account_s_primary_token():
    accounts = Accounts.from_config({"TWILIO_ACCOUNTS": TWO_ACCOUNTS, "TWILIO_AUTH_TOKEN": None})
    assert accounts.auth_token(ALICE) == "alice-new"
    assert accounts.auth_token(BOB) == "bob-token"
    assert accounts.auth_token(CAROL) is None
    single = Accounts.from_config({"TWILIO_ACCOUNTS": None, "TWILIO_AUTH_TOKEN": "new,old"})
    assert single.auth_token(CAROL) == "new"  # one account answers every AccountSid


def test_the_simulator_talks_as_the_app_s_first_account(redis_url):
    app = accounts_app(redis_url)
    twilio = TwilioSimulator.for_app(app)
    assert twilio.account_sid == ALICE
    assert twilio.send(REY, OURS, "hi").status == 200
    assert TwilioSimulator("http://localhost/sms", "new,old").validator.token == b"new"
