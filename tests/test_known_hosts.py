"""known_hosts matching without a cluster: OpenSSH's patterns, the name index and the
parsed file kept until it changes (the cluster tests check real sshd host keys)."""

import base64
import os

import paramiko
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbench_daemon.known_hosts import KnownHosts, KnownKey, _Table, known_names
from mlbench_daemon.ssh_errors import Untrusted


@pytest.fixture(scope="module")
def keys():
    return [public(b) for b in BLOBS]


# two fixed ed25519 public keys (no private part is needed to check a host key)
BLOBS = [
    "AAAAC3NzaC1lZDI1NTE5AAAAIK0ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZ",
    "AAAAC3NzaC1lZDI1NTE5AAAAIBERERERERERERERERERERERERERERERERERERERERER",
]


def public(b64):
    return paramiko.PKey.from_type_string("ssh-ed25519", base64.b64decode(b64))


def line(names, key):
    return f"{names} {key.get_name()} {key.get_base64()}\n"


def test_a_nonstandard_port_line_matches_literally(tmp_path, keys):
    # `[name]:port` is literal text in OpenSSH; fnmatch read `[...]` as a character class,
    # so such a line never matched and accept-new pinned the node again at every login
    kh = tmp_path / "known_hosts"
    kh.write_text(line("[w-1.example]:2222,[10.0.0.1]:2222", keys[0]))
    hosts = KnownHosts(str(kh), False, "yes")
    hosts.verify(keys[0], known_names("10.0.0.1", 2222, "w-1.example"), "w-1")
    with pytest.raises(Untrusted) as info:
        hosts.verify(keys[1], known_names("10.0.0.1", 2222, "w-1.example"), "w-1")
    assert info.value.reason == "host-key-changed"
    with pytest.raises(Untrusted) as info:  # the same host on port 22 is another entry
        hosts.verify(keys[0], known_names("10.0.0.1", 22, "w-1.example"), "w-1")
    assert info.value.reason == "host-key-unknown"


def test_accept_new_pins_a_nonstandard_port_once(tmp_path, keys):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    hosts = KnownHosts(str(kh), False, "accept-new")
    names = known_names("10.0.0.2", 2200, "w-2.example")
    for _ in range(3):
        hosts.verify(keys[0], names, "w-2")
    assert kh.read_text() == line(",".join(names), keys[0])


def test_an_edit_of_the_file_is_seen_by_the_next_check(tmp_path, keys):
    kh = tmp_path / "known_hosts"
    kh.write_text(line("w-3.example,10.0.0.3", keys[0]))
    hosts = KnownHosts(str(kh), False, "yes")
    names = known_names("10.0.0.3", 22, "w-3.example")
    hosts.verify(keys[0], names, "w-3")
    # same size, same inode, a later mtime: the node was reinstalled, the operator updated it
    kh.write_text(line("w-3.example,10.0.0.3", keys[1]))
    st = kh.stat()
    os.utime(kh, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    hosts.verify(keys[1], names, "w-3")
    with pytest.raises(Untrusted) as info:
        hosts.verify(keys[0], names, "w-3")
    assert info.value.reason == "host-key-changed"
    kh.unlink()
    with pytest.raises(Untrusted) as info:
        hosts.verify(keys[1], names, "w-3")
    assert info.value.reason == "host-key-unknown"


NAMES = ["w-1", "w-2", "W-3", "10.0.0.1", "[w-1]:2222", "w-10"]
PATTERN = st.sampled_from([*NAMES, "w-*", "w-?", "*", "!w-2", "!w-*", "10.0.0.?", "[w-?]:2222"])


@settings(max_examples=200, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.lists(PATTERN | st.just("|1|hashed"), min_size=1, max_size=3), st.booleans()),
        max_size=8,
    ),
    asked=st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
)
def test_the_name_index_finds_what_matching_every_line_finds(entries, asked):
    key = public(BLOBS[0])
    hashed = paramiko.HostKeys.hash_host("w-2")
    keys = [
        KnownKey(tuple(hashed if p == "|1|hashed" else p for p in pats), key, revoked)
        for pats, revoked in entries
    ]
    table = _Table((), keys)
    assert table.matching(asked) == [k for k in keys if any(k.matches(n) for n in asked)]
