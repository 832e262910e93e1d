"""The tokens file (issue 24 item 1): add/list/revoke, the check of a presented token, the
reload on change (revocation without a restart), and the one hash per request."""

import json
import os
import stat
import threading
import time

import pytest

from mlbench_daemon import cli, tokens
from mlbench_daemon.tokens import RECHECK_S, Caller, Tokens
from mlbench_daemon.vocabulary import Refusal, Role


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def bearer(token):
    return f"Bearer {token}"


def test_add_prints_a_token_once_and_stores_only_its_hash(tmp_path):
    path = str(tmp_path / "tokens.json")
    token = tokens.add(path, "alice", Role.SUBMITTER)
    token_id, _, secret = token.partition(".")
    text = open(path).read()
    assert secret not in text and token not in text  # only the hash is kept
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (entry,) = json.loads(text)["tokens"]
    assert (entry["id"], entry["name"], entry["role"], entry["revoked"]) == (
        token_id,
        "alice",
        "submitter",
        None,
    )
    assert Tokens(path).check(bearer(token)) == Caller("alice", Role.SUBMITTER)


def test_a_presented_token_is_checked_against_its_own_entry(tmp_path):
    path = str(tmp_path / "tokens.json")
    alice = tokens.add(path, "alice", Role.VIEWER)
    bob = tokens.add(path, "bob", Role.ADMIN)
    table = Tokens(path, legacy="the-old-one")
    assert table.check(bearer(bob)) == Caller("bob", Role.ADMIN)
    assert table.check(bearer(alice)) == Caller("alice", Role.VIEWER)
    alice_id = alice.partition(".")[0]
    bob_secret = bob.partition(".")[2]
    assert table.check(bearer(f"{alice_id}.{bob_secret}")) is Refusal.BAD_TOKEN  # id + other secret
    assert table.check(bearer(alice[:-1])) is Refusal.BAD_TOKEN
    assert table.check(bearer("0123456789ab.x")) is Refusal.BAD_TOKEN  # no such id
    assert table.check("") is Refusal.NO_TOKEN
    assert table.check(f"Basic {alice}") is Refusal.NO_TOKEN
    assert table.check(bearer("the-old-one")) == Caller("admin", Role.ADMIN)  # token_file


def test_one_hash_per_check_with_a_thousand_entries(tmp_path, monkeypatch):
    path = str(tmp_path / "tokens.json")
    last = tokens.add(path, "t0", Role.VIEWER)
    entries = json.loads(open(path).read())["tokens"]  # one real entry, 999 more below
    for n in range(1, 1000):
        entries.append({**entries[0], "id": f"{n:012x}", "name": f"t{n}"})
    with open(path, "w") as f:
        json.dump({"tokens": entries}, f)
    table = Tokens(path)
    hashed = []
    real = tokens._digest
    monkeypatch.setattr(
        tokens, "_digest", lambda salt, secret: hashed.append(1) or real(salt, secret)
    )
    assert table.check(bearer(last)) == Caller("t0", Role.VIEWER)
    assert table.check(bearer("fffffffffff0.nope")) is Refusal.BAD_TOKEN
    assert len(hashed) == 2  # one per check, whatever the table's size


def test_revoked_token_is_refused_after_the_next_recheck_without_a_restart(tmp_path):
    path = str(tmp_path / "tokens.json")
    token = tokens.add(path, "alice", Role.SUBMITTER)
    clock = Clock()
    table = Tokens(path, clock=clock)
    assert table.check(bearer(token)) == Caller("alice", Role.SUBMITTER)
    (revoked,) = tokens.revoke(path, "alice")
    assert revoked.name == "alice"
    assert table.check(bearer(token)) == Caller("alice", Role.SUBMITTER)  # not stat()ed yet
    clock.now += RECHECK_S
    assert table.check(bearer(token)) is Refusal.REVOKED
    assert RECHECK_S < 1.0  # the promise: within a second
    again = tokens.add(path, "alice", Role.VIEWER)  # the name is free again
    clock.now += RECHECK_S
    assert table.check(bearer(again)) == Caller("alice", Role.VIEWER)
    assert table.check(bearer(token)) is Refusal.REVOKED


def test_revocation_takes_effect_within_a_second_in_real_time(tmp_path):
    path = str(tmp_path / "tokens.json")
    token = tokens.add(path, "alice", Role.ADMIN)
    table = Tokens(path)
    assert isinstance(table.check(bearer(token)), Caller)
    tokens.revoke(path, "alice")
    revoked_at = time.monotonic()
    while table.check(bearer(token)) is not Refusal.REVOKED:
        assert time.monotonic() - revoked_at < 1.0, "a revoked token still works after 1 s"
        time.sleep(0.01)


def test_a_file_others_may_read_is_refused_at_start_and_fails_closed_on_reload(tmp_path):
    path = str(tmp_path / "tokens.json")
    token = tokens.add(path, "alice", Role.ADMIN)
    clock = Clock()
    table = Tokens(path, legacy="old", clock=clock)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match=r"mode 0644.*chmod 600"):
        Tokens(path)
    os.utime(path, ns=(1, 1))  # a change the reload sees
    clock.now += RECHECK_S
    assert table.check(bearer(token)) is Refusal.BAD_TOKEN  # every named token refused
    assert table.check(bearer("old")) == Caller("admin", Role.ADMIN)  # token_file still works


def test_names_are_checked_and_unique_among_live_tokens(tmp_path):
    path = str(tmp_path / "tokens.json")
    tokens.add(path, "alice", Role.VIEWER)
    for name, message in (
        ("alice", "exists"),
        ("admin", "token_file"),
        ("has space", "must match"),
        ("", "must match"),
    ):
        with pytest.raises(ValueError, match=message):
            tokens.add(path, name, Role.VIEWER)
    with pytest.raises(ValueError, match="no live token"):
        tokens.revoke(path, "nobody")


def test_concurrent_checks_during_reloads_never_fail_open(tmp_path):
    """Checks racing a revocation see the token either live or revoked, never an error."""
    path = str(tmp_path / "tokens.json")
    token = tokens.add(path, "alice", Role.ADMIN)
    table = Tokens(path, clock=Clock())  # every check may reload: the clock never moves...
    table._next_check = 0.0
    seen = set()

    def hammer():
        for _ in range(300):
            table._next_check = 0.0  # ...and each check is due for a stat
            seen.add(table.check(bearer(token)))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    tokens.revoke(path, "alice")
    for t in threads:
        t.join(60)
    assert seen <= {Caller("alice", Role.ADMIN), Refusal.REVOKED}
    table._next_check = 0.0
    assert table.check(bearer(token)) is Refusal.REVOKED


def test_cli_token_add_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "tokens.json")
    assert cli.main(["token", "add", "alice", "--role", "submitter", "--file", path]) == 0
    token = capsys.readouterr().out.strip()
    assert Tokens(path).check(bearer(token)) == Caller("alice", Role.SUBMITTER)
    assert cli.main(["token", "list", "--file", path, "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["role"], listed["revoked"]) == ("alice", "submitter", None)
    assert token.partition(".")[2] not in json.dumps(listed)
    assert cli.main(["token", "revoke", "alice", "--file", path]) == 0
    assert "revoked alice" in capsys.readouterr().out
    assert Tokens(path).check(bearer(token)) is Refusal.REVOKED
    assert cli.main(["token", "revoke", "alice", "--file", path]) == 1
    assert "no live token" in capsys.readouterr().err
    assert cli.main(["token", "add", "--file", path]) == 2  # no name
    assert cli.main(["token", "list"]) == 2  # no file
