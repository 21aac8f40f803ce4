"""The store package itself: its Lua files, how they are assembled, and what a Redis error in
one of them names."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import redis

from service.keys import Keys
from service.settings import load
from service.store import Commit, ConversationStore, Opened, Script, Waiting, decode_turn
from service.store.scripts import USES, source
from service.store.store import new_token

STORE = Path(__file__).resolve().parent.parent / "service" / "store"
SCRIPTS = ("open.lua", "save.lua", "release.lua", "end.lua", "expire.lua", "index_drop.lua", "index_page.lua")


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_is_headed_by_its_contract(name):
    """KEYS, ARGV and what it returns, in the file itself (or, for the conversation scripts'
    shared keys and settings, in common.lua, which each of them uses first)."""
    text = (STORE / name).read_text()
    header = "\n".join(itertools.takewhile(lambda line: line.startswith("--"), text.splitlines()))
    assert "Returns" in header and "ARGV[" in header and "KEYS[" in header
    uses = USES.search(text)
    if uses:
        assert uses[1].split()[0] == "common.lua"


def test_a_script_is_its_helpers_then_itself_with_a_line_map():
    save = source("save.lua")
    parts = save.text.splitlines()
    assert len(parts) == len(save.lines)
    for number, (name, line) in enumerate(save.lines, 1):
        assert parts[number - 1] == (STORE / name).read_text().splitlines()[line - 1]
    assert [name for name, line in save.lines if line == 1] == USES.search(save.text)[1].split() + [
        "save.lua"
    ]


def test_a_redis_error_names_the_file_and_line_of_the_script(redis_url):
    """Redis says ``user_script:N``, a line of the assembled text; the store's error says
    ``service/store/<file>.lua:M`` instead. Provoked by a conversation hash of the wrong
    type: the first command on it is OPEN's HMGET."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = ConversationStore.from_config(client, _config())
    keys = Keys().conversation("+15551230001", "+15550001111")
    client.set(keys.conversation, "not a hash")
    with pytest.raises(redis.ResponseError) as raised:
        store.open(keys, "SM1")
    message = str(raised.value)
    assert "user_script" not in message and "WRONGTYPE" in message
    (where,) = set(re.findall(r"service/store/(\w+\.lua):(\d+)", message))
    line = (STORE / where[0]).read_text().splitlines()[int(where[1]) - 1]
    assert where[0] == "open.lua" and "redis.call('HMGET', conversation" in line


def test_an_error_in_a_helper_names_the_helper(redis_url):
    """An error raised inside a helper names that helper's file, not the script's."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = ConversationStore.from_config(client, _config())
    keys = Keys().conversation("+15551230001", "+15550001111")
    client.set(keys.minutes, "not a hash")  # SAVE's first write is a tally (tally.lua's count)
    opened = store.open(keys, "SM1")
    with pytest.raises(redis.ResponseError, match=r"service/store/tally\.lua:\d+"):
        store.save(keys, opened, Commit(sid="s", state="{}", is_new=True, message_sid="SM1", answer="t"))


def test_the_index_scripts_explain_their_errors_too(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.set("not-a-zset", "x")
    with pytest.raises(redis.ResponseError, match=r"service/store/index_page\.lua:\d+"):
        Script(client, "index_page.lua")(["not-a-zset"], [1, "a|b", 0, 10])


def test_settings_are_arguments_so_every_store_shares_its_scripts():
    """No setting is compiled into a script's text: stores of different settings run the
    same scripts (the same SHAs)."""
    one = ConversationStore(
        redis.Redis(), ttl=60, lock_ttl=1, lock_wait=1, redelivery_window=5, replies_kept=2
    )
    other = ConversationStore(
        redis.Redis(), ttl=900, lock_ttl=9, lock_wait=9, redelivery_window=60, replies_kept=50
    )
    assert [s.sha for s in one.scripts] == [s.sha for s in other.scripts]
    assert all("@" not in script.source.text for script in one.scripts)


def _config():
    return load({})


def test_a_turn_is_decoded_by_its_names_and_anything_else_means_ask_again():
    """OPEN's reply and a hand-over's JSON copy of it decode alike; a release's ``1`` and the
    positional turn of a version before service/store/ (0.1.0: ``["ok", now, …]``, which this
    version's saves never push to a ``;`` token, but an operator or a bug might) mean "ask
    again"."""
    opened = ["status", "opened", "now", 5, "sid", "s", "state", "{}", "seq", "2", "first_seen", "4"]
    opened += ["ended_overdue", 0]
    assert (
        decode_turn("t", opened)
        == decode_turn("t", json.dumps(opened))
        == Opened("t", 5, None, "s", "{}", "2", "4")
    )
    assert decode_turn("t", ["status", "answered", "answer", "tHi", "sid", "s"]) == Opened(
        "t", answered="tHi", sid="s"
    )
    assert decode_turn("t", ["status", "waiting", "ahead", 3]) == Waiting(3)
    assert decode_turn("t", "1") is None
    assert decode_turn("t", json.dumps(["ok", 5, "s", "{}", "2", "4", 0])) is None


def test_a_save_of_the_version_before_wakes_this_versions_waiters_to_ask_again(redis_url):
    """During a rolling deploy the other way round: the version before service/store/ hands
    the lock with its turn only to a token its pattern ``^(.*):%x+$`` (its hand-over's test)
    reads a MessageSid from, else wakes the waiter to ask again; no token of this version
    passes it, whatever its MessageSid holds."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    tokens = [new_token(sid) for sid in ("SM0123", "SM:beef", "a:b:c", "x;y", "SMab:")]
    matched = client.eval(
        "local found = {} for i, token in ipairs(ARGV) do "
        "found[i] = string.match(token, '^(.*):%x+$') or '' end return found",
        0,
        *tokens,
    )
    assert matched == [""] * len(tokens)
