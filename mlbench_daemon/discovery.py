"""DNS -> list of Node: SRV/A/AAAA/PTR/TXT records, label rules, selectors, natural sort.

No SSH and no HTTP here. `Discovery` takes the `cfg.discovery` section (any object with
the attributes `service`, `srv`, `nameservers`, `namespace`, `timeout_s`, `recheck_s`,
`label_rules`)
and an optional dnspython resolver, so tests can drive it.

One discovery pass:

* SRV `<srv>.<service>`: each target is a member (host name + SSH port); its address
  comes from the additional section of the SRV answer, else from A (then AAAA) queries.
* No SRV records at all: the A/AAAA records of the service are the members (port =
  `ssh_port`), named by the PTR record of each address, or by the address itself.
* Labels: TXT strings `key=value` at the member's host name, then the config's label
  rules in order (rules win).

Every name is queried absolute, with one deadline of `timeout_s` for the whole pass.

Idle cost: a pass asks for the member list (one SRV query, or the service's A and
AAAA) every time; a member's address, TXT labels and PTR name are read when it
appears and then re-read once every `recheck_s` (the first re-read of each spread
at random over the second half of that period, so a big cluster's re-reads do not
come all at once), so an idle pass costs about one query plus the changes. The
records' TTLs do not shorten that: a TTL of 0 means "do not cache", and the member
list is still read every pass. `recheck_s = 0` re-reads everything every pass.

Past one DNS message: an SRV answer holds about 700 members at most (64 KB over TCP;
dnsmasq already answers malformed past about 300). With `transfer_zone` set, discovery
keeps a copy of that zone, made by zone transfer from the first nameserver: AXFR once,
then each pass an IXFR from the copy's serial, which costs one SOA when nothing changed
and only the changes otherwise (a server without IXFR, like NSD before 4.7, sends the
whole zone again when it changed). The pass then reads the names inside the zone from
the copy, and queries only the names outside it (the reverse zone's PTR, out-of-zone
targets), with the same per-member caches, misses and notes as query mode. An unchanged
serial returns the last pass's list without rebuilding it, unless a name outside the
zone or a kept miss is due again. Chosen over several SRV service names (shards), which
re-read every member every pass: see README.md, "Discovery past one DNS message".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import ipaddress
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Never

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.transaction
import dns.xfr
import dns.zone

from mlbench_daemon import config, metrics
from mlbench_daemon.config import parse_nameserver
from mlbench_daemon.shapes import LABEL_KEY, LABEL_NAME
from mlbench_daemon.vocabulary import DiscoveryReason, checked

log = logging.getLogger(__name__)

REASONS = tuple(r for r in DiscoveryReason if r != DiscoveryReason.NOT_DISCOVERED_YET)


class DiscoveryError(Exception):
    """A discovery pass failed; `.reason` is one of REASONS, str() is the human message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = DiscoveryReason(checked(reason, REASONS, "DiscoveryError"))


# --- nodes -----------------------------------------------------------------------------


class Labels(dict[str, str]):
    """A read-only, hashable dict with its keys in sorted order.

    A dict (not just a Mapping) so that json.dumps and str() treat it like the plain dict
    it compares equal to.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(sorted(dict(*args, **kwargs).items()))

    def __hash__(self) -> int:  # type: ignore[override]  # dict is unhashable; these are not
        return hash(tuple(self.items()))

    def __reduce__(self) -> tuple[type[Labels], tuple[dict[str, str]]]:
        return (Labels, (dict(self),))

    def _read_only(self, *args: Any, **kwargs: Any) -> Never:
        raise TypeError("node labels are read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


@dataclasses.dataclass(frozen=True)
class Node:
    name: str  # first DNS label of host, else the IP
    host: str  # host name without trailing dot, or the IP
    ip: str
    port: int
    namespace: str
    labels: Mapping[str, str] = Labels()  # TXT labels merged with config rules (rules win)
    note: str = ""  # why discovery kept it partly: an address lookup error, capped labels

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            object.__setattr__(self, "labels", Labels(self.labels))

    @property
    def labels_str(self) -> str:
        """The seed's format: str() of the label dict with keys sorted."""
        return str(dict(self.labels))


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key putting "w-2" before "w-10"; ties broken by the exact name."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name)


# --- selectors -------------------------------------------------------------------------

# Label syntax (Kubernetes): shapes.LABEL_NAME, LABEL_KEY (the request's selector
# pattern is built from them too).
_KEY_RE = re.compile(LABEL_KEY)
_VALUE_RE = re.compile(rf"(?:{LABEL_NAME})?")
# Operators, longest first so that "!=" and "==" are not read as "=".
_OPS = (("!=", "!="), ("==", "="), ("=", "="))


@dataclasses.dataclass(frozen=True, order=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists"
    value: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "=":
            return self.key in labels and labels[self.key] == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        return (self.key in labels) == (self.op == "exists")

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.value}"
        return self.key if self.op == "exists" else f"!{self.key}"


def _check_key(key: str, term: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if not _KEY_RE.fullmatch(key) or len(prefix) > 253:
        raise ValueError(
            f"selector term {term!r}: bad label key {key!r} "
            "(want [prefix/]name, name up to 63 of [A-Za-z0-9-_.] starting and ending alphanumeric)"
        )
    return key


def _check_value(value: str, term: str) -> str:
    if not _VALUE_RE.fullmatch(value):
        raise ValueError(
            f"selector term {term!r}: bad label value {value!r} "
            "(want up to 63 of [A-Za-z0-9-_.] starting and ending alphanumeric, or empty)"
        )
    return value


def _parse_term(term: str) -> Requirement:
    for token, op in _OPS:
        if token in term:
            key, _, value = term.partition(token)
            return Requirement(_check_key(key.strip(), term), op, _check_value(value.strip(), term))
    if term.startswith("!"):
        return Requirement(_check_key(term[1:].strip(), term), "!exists")
    return Requirement(_check_key(term, term), "exists")


@dataclasses.dataclass(frozen=True)
class Selector:
    """A Kubernetes equality-based label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
    comma-separated.

    Requirements are kept sorted and without duplicates, so equal selectors compare equal
    and str() is canonical. The empty selector matches everything.
    """

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not text.strip():
            return cls()
        terms = [t.strip() for t in text.split(",")]
        if "" in terms:
            raise ValueError(f"selector {text!r}: empty term (stray comma?)")
        return cls(tuple(sorted(set(map(_parse_term, terms)))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(map(str, self.requirements))


# --- DNS -------------------------------------------------------------------------------


def namespace_of(service: str, default: str) -> str:
    """`<ns>` when the service is `<svc>.<ns>.svc.<zone...>`, else `default`."""
    labels = service.rstrip(".").split(".")
    if len(labels) >= 4 and labels[2].lower() == "svc":
        return labels[1]
    return default


def txt_labels(rdatas: Iterable[Any]) -> dict[str, str]:
    """RFC 6763 key/value strings: `k=v`, `k` alone = empty value, first key wins, `=x` ignored."""
    labels: dict[str, str] = {}
    for rdata in sorted(rdatas, key=lambda r: r.strings):  # several TXT records: a stable order
        for raw in rdata.strings:
            key, _, value = raw.decode("utf-8", errors="replace").partition("=")
            if key:
                labels.setdefault(key, value)
    return labels


def cap_labels(
    labels: Mapping[str, str], max_bytes: int, max_keys: int, max_value: int
) -> tuple[dict[str, str], str]:
    """The labels within the caps (in the TXT order, so the first ones are kept) and a note
    saying what was dropped ("" when nothing was)."""
    kept: dict[str, str] = {}
    size, long_values, over = 0, 0, 0
    for key, value in labels.items():
        if len(value) > max_value:
            long_values += 1
            continue
        cost = len(f"{key}={value}".encode())
        if len(kept) >= max_keys or size + cost > max_bytes:
            over += 1
            continue
        kept[key] = value
        size += cost
    if not long_values and not over:
        return kept, ""
    parts = [f"{long_values} with a value over {max_value} characters"] if long_values else []
    if over:
        parts.append(f"{over} beyond {max_keys} keys or {max_bytes} bytes")
    return kept, f"labels capped: dropped {long_values + over} of {len(labels)} TXT keys (" + (
        "; ".join(parts) + ")"
    )


def negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308: how long a negative answer may be kept, the smaller of the SOA's TTL and
    its MINIMUM field; None without an SOA in the authority section."""
    for rrset in response.authority if response is not None else ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return None


@dataclasses.dataclass(frozen=True)
class _Member:
    """An SRV target's address as last looked up."""

    ip: str | None  # the last address it had (kept through a lookup error)
    kind: str  # "ok", "nxdomain", "nodata", "dns-error"
    note: str  # why it has no (fresh) address; "" when ok
    due: float  # monotonic time of the next lookup while kind != "ok"
    failures: int = 0  # consecutive lookup errors (backoff)


_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


def _ip_order(address: str) -> tuple[int, int]:
    """IPv4 before IPv6, then numeric."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


class _Delta:
    """What one transfer changed: `full` (a whole zone came: anything may have), else
    the records an IXFR added and deleted, one (added, name, rdataset) each."""

    def __init__(self) -> None:
        self.full = False
        self.records: list[tuple[bool, dns.name.Name, Any]] = []


class _RecordingTransaction(dns.zone.Transaction):
    """Notes each record an IXFR adds or deletes (dnspython's xfr.Inbound applies an
    IXFR with add() and delete_exact(), one record each)."""

    def add(self, *args: Any) -> None:
        self._note(True, args)
        super().add(*args)

    def delete_exact(self, *args: Any) -> None:
        self._note(False, args)
        if len(args) != 2 or not isinstance(args[1], dns.rdataset.Rdataset):
            super().delete_exact(*args)
            return
        # dnspython's own checks that the records exist by hashing every record of the
        # set (an intersection): O(members) per SRV record an IXFR deletes. The same
        # check, hashing only the deleted ones:
        name, rdataset = args
        txn: Any = self  # dnspython's private parts are untyped
        existing = txn._get_rdataset(name, rdataset.rdtype, rdataset.covers)
        if existing is None or any(rd not in existing for rd in rdataset):
            raise dns.transaction.DeleteNotExact("delete_exact(): missing rdatas")
        remaining = existing.difference(rdataset)  # a copy keeps the stored hashes
        if remaining:
            txn._checked_put_rdataset(name, remaining)
        else:
            txn._checked_delete_rdataset(name, rdataset.rdtype, rdataset.covers)

    def _note(self, added: bool, args: tuple[Any, ...]) -> None:
        delta = self.manager.delta  # type: ignore[attr-defined]
        if len(args) == 2 and isinstance(args[1], dns.rdataset.Rdataset):
            delta.records.append((added, args[0], args[1]))
        else:
            delta.full = True  # another form: do not reason about it


class _RecordingZone(dns.zone.Zone):
    """A zone whose writers note what they change in `delta`."""

    def __init__(self, origin: dns.name.Name) -> None:
        super().__init__(origin, relativize=False)  # names as queried
        self.delta = _Delta()

    def writer(self, replacement: bool = False) -> dns.zone.Transaction:
        if replacement:
            self.delta.full = True
        txn = _RecordingTransaction(self, replacement)
        txn._setup_version()  # type: ignore[no-untyped-call]  # what Zone.writer does
        return txn


class _ZoneCopy:
    """A copy of one zone kept by zone transfer (AXFR, then IXFR from its serial)."""

    def __init__(self, origin: str, where: str, port: int) -> None:
        self.origin = dns.name.from_text(origin)
        self.where, self.port = where, port
        self.zone = _RecordingZone(self.origin)
        self.serial: int | None = None
        self.lock = threading.Lock()  # held by a whole pass: a transfer rewrites the zone

    def refresh(self, deadline: float) -> _Delta | None:
        """Bring the copy up to date; what changed, or None when its serial did not. A
        failed transfer leaves the copy as it was (the transfer commits only when
        complete)."""
        remaining = deadline - time.monotonic()
        what = f"zone transfer of {self.origin} from {self.where}:{self.port}"
        if remaining <= 0:
            raise DiscoveryError(
                DiscoveryReason.DNS_TIMEOUT, f"DNS timeout: no time left for {what}"
            )
        query, _ = dns.xfr.make_query(self.zone)  # IXFR from our serial; AXFR when empty
        self.zone.delta = _Delta()
        try:
            dns.query.inbound_xfr(
                self.where, self.zone, query, port=self.port, timeout=remaining, lifetime=remaining
            )
        except dns.exception.Timeout:
            raise DiscoveryError(DiscoveryReason.DNS_TIMEOUT, f"DNS timeout in {what}") from None
        except dns.xfr.TransferError as e:
            hint = ""
            if e.rcode in (dns.rcode.REFUSED, dns.rcode.NOTAUTH):
                hint = (
                    ": the server must allow transfers of this zone to the daemon's address"
                    " (or leave discovery.transfer_zone empty)"
                )
            raise DiscoveryError(
                DiscoveryReason.DNS_ERROR, f"{what} answered {dns.rcode.to_text(e.rcode)}{hint}"
            ) from None
        except (dns.exception.DNSException, OSError, EOFError) as e:
            raise DiscoveryError(DiscoveryReason.DNS_ERROR, f"{what} failed: {e}") from None
        soa = self.zone.get_soa()
        serial, self.serial = self.serial, soa.serial
        return None if serial == soa.serial else self.zone.delta

    def answer(self, p: _Pass, name: dns.name.Name, rdtype: str) -> list[Any] | None:
        """The rdatas of name's records of rdtype in the copy; None (and the negative TTL
        noted, as from a server's SOA) when the name or the type does not exist."""
        node = self.zone.get_node(name)
        rdataset = None
        if node is not None:
            rdataset = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
        if rdataset is None:
            if node is None:
                p.nxdomain.add(name)
            soa = self.zone.find_rdataset(self.origin, dns.rdatatype.SOA)
            p.negative.setdefault(name, []).append(float(min(soa.ttl, soa[0].minimum)))
            return None
        p.ttl = min(p.ttl, rdataset.ttl)
        return list(rdataset)

    def address(self, host: dns.name.Name) -> str | None:
        """host's first IPv4 (else IPv6) address in the copy."""
        node = self.zone.get_node(host)
        if node is None:
            return None
        for rdtype in _ADDRESS_TYPES:
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset:
                return str(min((a.address for a in rdataset), key=_ip_order))
        return None


class Discovery:
    def __init__(
        self,
        cfg: config.Discovery,
        resolver: dns.resolver.Resolver | None = None,
        *,
        ssh_port: int = 22,
    ) -> None:
        if not cfg.service:
            raise ValueError("discovery.service is empty")
        self.cfg = cfg
        self.ssh_port = ssh_port
        self.service = dns.name.from_text(cfg.service)  # absolute: no search domains, ever
        self.srv_name = dns.name.from_text(cfg.srv, origin=self.service)
        self.namespace = namespace_of(cfg.service, cfg.namespace)
        if resolver is None:
            if cfg.nameservers:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in cfg.nameservers
                ]
            else:
                try:
                    resolver = dns.resolver.Resolver()
                except dns.resolver.NoResolverConfiguration as e:
                    raise DiscoveryError(
                        DiscoveryReason.DNS_ERROR,
                        f"discovery.nameservers is empty and the system resolver is unusable: {e}",
                    ) from None
        self.resolver = resolver
        self.recheck_s = cfg.recheck_s
        self._copy: _ZoneCopy | None = None
        self._last: tuple[list[Node], float, float] | None = None  # nodes, ttl, due
        self._order: list[tuple[tuple[Any, ...], Node]] | None = None  # (sort key, node)
        if cfg.transfer_zone:
            if not cfg.nameservers:
                raise ValueError("discovery.transfer_zone needs discovery.nameservers (its server)")
            origin = dns.name.from_text(cfg.transfer_zone)
            if not self.srv_name.is_subdomain(origin):
                raise ValueError(
                    f"discovery.transfer_zone {cfg.transfer_zone} does not hold {self.srv_name}"
                )
            self._copy = _ZoneCopy(cfg.transfer_zone, *parse_nameserver(cfg.nameservers[0]))
        self._cache: dict[tuple[str, Any], tuple[Any, float]] = {}  # (kind, name) -> (value, due)
        self._cache_lock = threading.Lock()
        self._members: dict[dns.name.Name, _Member] = {}  # SRV target -> its address state
        self._notes: dict[str, str] = {}  # node name -> its logged note
        self._last_txt: dict[tuple[str, Any], dict[str, str]] = {}  # ("txt", host) -> labels

    def _cached(
        self, p: _Pass, key: tuple[str, Any], read: Callable[[], Any], fresh: Any = None
    ) -> Any:
        """read() once every recheck_s per key (`fresh`: a value just seen, no read needed);
        `None` values are never kept. A name inside the zone copy is read every time: the
        copy is as fresh as its last transfer, and reading it costs no query."""
        p.used.add(key)
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and now < hit[1] and not p.inside(key[1]):
            if fresh is not None and fresh != hit[0]:
                with self._cache_lock:
                    self._cache[key] = (fresh, hit[1])
                return fresh
            return hit[0]
        value = fresh if fresh is not None else read()
        if value is not None and self.recheck_s > 0:
            spread = 1.0 if hit is not None else random.uniform(0.5, 1.0)
            with self._cache_lock:
                self._cache[key] = (value, now + self.recheck_s * spread)
        return value

    def _forget_unused(self, p: _Pass) -> None:
        """After a good pass: drop what this pass did not use (members that left)."""
        with self._cache_lock:
            for key in self._cache.keys() - p.used:
                del self._cache[key]
            for target in self._members.keys() - p.targets:
                del self._members[target]
            for name in self._notes.keys() - p.names:
                del self._notes[name]
            for key in self._last_txt.keys() - p.used:
                del self._last_txt[key]

    def discover(self) -> tuple[list[Node], float]:
        """All members (unfiltered, natural order) and the shortest TTL of the answers used.

        Raises DiscoveryError. An SRV target whose name or address does not exist is
        dropped, and its miss is kept per RFC 2308 (the SOA minimum within
        `negative_ttl_min_s`..`negative_ttl_max_s`, else `negative_ttl_fallback_s`); a
        server error on its address lookup keeps its last known address with a note (or
        drops it when it never had one) and is retried with backoff. Each logs one line
        per change of state. A timeout, or a server failure on any other query, fails the
        whole pass, so the caller keeps its last good list.
        Safe to call from several threads: a pass keeps its state in a _Pass.
        """
        if self._copy is None:
            return self._discover(_Pass(self.resolver, time.monotonic() + self.cfg.timeout_s))
        with self._copy.lock:
            p = _Pass(self.resolver, time.monotonic() + self.cfg.timeout_s, self._copy)
            delta = self._copy.refresh(p.deadline)
            last = self._last
            if last is not None and time.monotonic() < last[2]:
                if delta is None:
                    return list(last[0]), last[1]
                if not delta.full and self._order is not None and self._apply(p, delta):
                    nodes = [node for _, node in self._order]
                    ttl = min(last[1], p.ttl)
                    self._last = (nodes, ttl, min(last[2], self._next_due(p)))
                    return list(nodes), ttl
            nodes, ttl = self._discover(p)
            self._last = (nodes, ttl, self._next_due(p))
            return list(nodes), ttl

    def _apply(self, p: _Pass, delta: _Delta) -> bool:
        """Bring the last list up to date with an IXFR's changes, rebuilding only the
        members whose records changed: a pass costs O(changes), not O(members). False
        (nothing touched) when a change needs a full pass: a target in two SRV records,
        or two targets sharing a first label."""
        assert self._order is not None
        order = {node.host: (key, node) for key, node in self._order}
        redo: dict[dns.name.Name, int] = {}  # target -> its SRV port
        gone: set[dns.name.Name] = set()  # targets no longer in the SRV records
        deleted: set[dns.name.Name] = set()  # targets with an SRV record deleted
        for added, owner, rdataset in delta.records:
            if owner != self.srv_name or rdataset.rdtype != dns.rdatatype.SRV:
                redo.setdefault(owner, -1)  # a member's own record: rebuilt when a member
                continue
            for rr in rdataset:
                if rr.target == dns.name.root:
                    continue
                if added:
                    if redo.get(rr.target, -1) not in (-1, rr.port):
                        return False
                    redo[rr.target] = rr.port
                    gone.discard(rr.target)
                else:
                    deleted.add(rr.target)
                    if redo.get(rr.target, -1) == -1:
                        gone.add(rr.target)
        names = {node.name: node.host for _, node in self._order}
        for target in gone:
            order.pop(target.to_text(omit_final_dot=True), None)
        built: dict[str, tuple[tuple[Any, ...], Node]] = {}
        for target, port in redo.items():
            host = target.to_text(omit_final_dot=True)
            if port == -1:
                if host not in order:
                    continue  # not a member
                port = order[host][1].port
            elif host in order and target not in deleted:
                return False  # a second SRV record for a member: the full pass picks one
            name = target.labels[0].decode(errors="replace")
            if names.get(name, host) != host:
                return False
            ip = self._member_address(p, target, p.additional_address(target, None))
            order.pop(host, None)
            if ip is not None:
                labels, note = self._labels(p, target, name)
                node = self._node(p, target, name, host, ip, port, labels, note)
                built[host] = (natural_key(name), node)
        order.update(built)
        with self._cache_lock:
            for target in gone - redo.keys():
                self._members.pop(target, None)
                for kind in ("addr", "txt"):
                    self._cache.pop((kind, target), None)
                self._last_txt.pop(("txt", target), None)
                self._notes.pop(target.labels[0].decode(errors="replace"), None)
        self._order = sorted(order.values(), key=lambda kn: kn[0])
        return True

    def _next_due(self, p: _Pass) -> float:
        """When an unchanged zone still needs a pass: the earliest retry of a kept miss,
        or the next pass when a name outside the zone was read (its TTL is not ours)."""
        outside = [key for key in p.used if not p.inside(key[1])]
        with self._cache_lock:
            dues = [self._cache[k][1] if k in self._cache else 0.0 for k in outside]
            dues += [m.due for m in self._members.values() if m.kind != "ok"]
        return min(dues, default=float("inf"))

    def _discover(self, p: _Pass) -> tuple[list[Node], float]:
        srv = p.query(self.srv_name, "SRV")
        if srv is not None:
            members = self._srv_members(p, srv)
        else:
            addresses = [a.address for t in ("A", "AAAA") for a in p.query(self.service, t) or ()]
            if p.nxdomain == {self.srv_name, self.service}:
                raise DiscoveryError(
                    DiscoveryReason.NXDOMAIN,
                    f"no such name: neither SRV {self.srv_name} nor A/AAAA {self.service} exists",
                )
            members = self._address_members(p, addresses)
        nodes: dict[str, Node] = {}
        twice = False  # a name (or a target) seen twice: the full pass picks one
        for target, ip, port in members:
            name = target.labels[0].decode(errors="replace") if target else ip
            host = target.to_text(omit_final_dot=True) if target else ip
            if name in nodes:
                twice = True
                if nodes[name].host != host:
                    kept = nodes[name].host
                    log.warning(
                        "%s: %s and %s share the name %s; keeping %s",
                        self.cfg.service,
                        kept,
                        host,
                        name,
                        kept,
                    )
                continue
            labels, note = self._labels(p, target, name)
            nodes[name] = self._node(p, target, name, host, ip, port, labels, note)
        if not nodes:
            raise DiscoveryError(
                DiscoveryReason.NO_MEMBERS,
                f"no members: SRV {self.srv_name} and A/AAAA {self.service} gave no usable address",
            )
        self._forget_unused(p)
        order = sorted((natural_key(n.name), n) for n in nodes.values())
        # what a zone copy's next IXFR updates (SRV members only: an address member's name
        # comes from a PTR query)
        self._order = order if srv is not None and not twice else None
        return [node for _, node in order], p.ttl

    def _node(
        self,
        p: _Pass,
        target: dns.name.Name | None,
        name: str,
        host: str,
        ip: str,
        port: int,
        labels: Labels,
        note: str,
    ) -> Node:
        """The member's Node, its note logged once per change."""
        address_note = p.notes.get(target) if target is not None else None
        note = "; ".join(filter(None, (address_note, note)))
        p.names.add(name)
        if self._notes.get(name, "") != note:
            if note:
                log.warning("%s: node %s: %s", self.cfg.service, name, note)
            else:
                log.info("%s: node %s: no note any more", self.cfg.service, name)
            self._notes[name] = note
        return Node(name, host, ip, port, self.namespace, labels, note)

    def _srv_members(self, p: _Pass, srv: Any) -> Iterable[tuple[Any, ...]]:
        """(target name, ip, port) per SRV target with an address."""
        for rr in sorted(srv, key=lambda r: (r.priority, -r.weight, r.target, r.port)):
            if rr.target == dns.name.root:  # "." = service decidedly not available there
                continue
            # an address in the SRV answer's additional section (or the zone copy) is free:
            # it counts as a read
            extra = p.additional_address(rr.target, getattr(srv, "response", None))
            ip = self._member_address(p, rr.target, extra)
            if ip is None:
                continue
            yield rr.target, ip, rr.port

    def _member_address(self, p: _Pass, target: dns.name.Name, extra: str | None) -> str | None:
        """target's address (None: none known), read through the caches; a miss or a lookup
        error is kept until its due time, and logged once per change of state."""
        p.targets.add(target)
        now = time.monotonic()
        with self._cache_lock:
            old = self._members.get(target)
        if extra is None and old is not None and old.kind != "ok" and now < old.due:
            p.used.add(("addr", target))
            if old.ip is not None:
                p.notes[target] = old.note
            return old.ip
        cfg = self.cfg
        try:
            ip = self._cached(
                p, ("addr", target), functools.partial(p.query_address, target), fresh=extra
            )
        except DiscoveryError as e:
            if e.reason != DiscoveryReason.DNS_ERROR:
                raise
            failures = old.failures + 1 if old is not None and old.kind == "dns-error" else 1
            delay = min(cfg.negative_ttl_min_s * 2 ** min(failures - 1, 30), cfg.negative_ttl_max_s)
            last = old.ip if old is not None else None
            note = f"address lookup failed ({e}); " + (
                f"keeping its last address {last}" if last else "not joined"
            )
            new = _Member(last, "dns-error", note, now + delay, failures)
        else:
            if ip is not None:
                new = _Member(ip, "ok", "", 0.0)
            else:
                kind = "nxdomain" if target in p.nxdomain else "nodata"
                ttl = p.negative_ttl(target)
                delay = (
                    cfg.negative_ttl_fallback_s
                    if ttl is None
                    else min(max(ttl, cfg.negative_ttl_min_s), cfg.negative_ttl_max_s)
                )
                what = "does not exist" if kind == "nxdomain" else "has no A/AAAA record"
                new = _Member(None, kind, f"{what}; skipped", now + delay)
        if new.kind != "ok":
            metrics.dns_member_misses_total.labels(new.kind).inc()
        was = (old.kind, old.note) if old is not None else ("ok", "")
        if was != (new.kind, new.note):
            if new.kind == "ok":
                log.info("%s: SRV target %s has an address again", self.srv_name, target)
            else:
                log.warning("%s: SRV target %s %s", self.srv_name, target, new.note)
        with self._cache_lock:
            self._members[target] = new
        if new.kind == "dns-error" and new.ip is not None:
            p.notes[target] = new.note
        return new.ip

    def _address_members(self, p: _Pass, addresses: list[str]) -> Iterable[tuple[Any, ...]]:
        """(PTR name or None, ip, ssh port) per address of the service."""
        for ip in sorted(set(addresses), key=_ip_order):
            name = self._cached(p, ("ptr", ip), functools.partial(_ptr_name, p, ip))
            yield (name or None), ip, self.ssh_port

    def _labels(self, p: _Pass, host: dns.name.Name | None, name: str) -> tuple[Labels, str]:
        """The node's labels (TXT within the caps, then the rules) and a note on the cap."""
        txt, note = {}, ""
        if host:
            key = ("txt", host)
            try:
                txt = self._cached(p, key, lambda: txt_labels(p.query(host, "TXT") or ()))
            except DiscoveryError as e:
                if e.reason != DiscoveryReason.DNS_ERROR:
                    raise
                txt = self._last_txt.get(key, {})
                note = f"TXT lookup failed ({e}); keeping its last labels"
            self._last_txt[key] = txt
        c = self.cfg
        labels, capped = cap_labels(txt, c.max_txt_bytes, c.max_txt_keys, c.max_label_value)
        note = "; ".join(filter(None, (note, capped)))
        for rule in c.label_rules:
            if fnmatch.fnmatchcase(name, rule["match"]):
                labels.update(rule["labels"])
        return Labels(labels), note


def _ptr_name(p: _Pass, ip: str) -> dns.name.Name | str:
    """The smallest PTR name of ip, or "" (no name: kept, so it is not asked every pass)."""
    ptr = p.query(dns.reversename.from_address(ip), "PTR", optional=True)
    return min(r.target for r in ptr) if ptr else ""


class _Pass:
    """The queries of one discovery pass: one deadline, the minimum TTL, the NXDOMAIN names,
    the cache keys it used."""

    def __init__(
        self, resolver: dns.resolver.Resolver, deadline: float, copy: _ZoneCopy | None = None
    ) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.copy = copy  # names inside its zone are read from it, not queried
        self.ttl = float("inf")
        self.nxdomain: set[dns.name.Name] = set()
        self.used: set[tuple[str, Any]] = set()
        self.targets: set[dns.name.Name] = set()  # SRV targets seen
        self.names: set[str] = set()  # node names seen
        self.notes: dict[dns.name.Name, str] = {}  # SRV target -> note on its address
        self.negative: dict[dns.name.Name, list[float | None]] = {}  # name -> negative TTLs

    def inside(self, name: Any) -> bool:
        """name is read from the zone copy."""
        return (
            self.copy is not None
            and isinstance(name, dns.name.Name)
            and name.is_subdomain(self.copy.origin)
        )

    def query(
        self, name: dns.name.Name, rdtype: str, optional: bool = False
    ) -> dns.resolver.Answer | list[Any] | None:
        """The answer (its rdatas, read from the zone copy), or None when the name or the
        type does not exist.

        optional=True: a server failure also gives None (logged). Used for PTR, which many
        servers refuse for reverse zones they do not serve.
        """
        if self.copy is not None and self.inside(name):
            return self.copy.answer(self, name, rdtype)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DiscoveryError(
                "dns-timeout", f"DNS timeout: no time left to query {rdtype} {name}"
            )
        try:
            answer = self.resolver.resolve(name, rdtype, search=False, lifetime=remaining)
        except dns.resolver.NXDOMAIN as e:
            self.nxdomain.add(name)
            responses = e.responses()
            self._negative(name, responses.get(name) or next(iter(responses.values()), None))
            return None
        except dns.resolver.NoAnswer as e:
            self._negative(name, e.response())
            return None
        except dns.exception.Timeout:
            raise DiscoveryError(
                DiscoveryReason.DNS_TIMEOUT, f"DNS timeout querying {rdtype} {name}"
            ) from None
        except (dns.exception.DNSException, OSError) as e:
            if optional:
                log.warning("DNS query %s %s failed, ignored: %s", rdtype, name, e)
                return None
            raise DiscoveryError(
                DiscoveryReason.DNS_ERROR, f"DNS error querying {rdtype} {name}: {e}"
            ) from None
        if answer.rrset is not None:
            self.ttl = min(self.ttl, answer.rrset.ttl)
        return answer

    def _negative(self, name: dns.name.Name, response: dns.message.Message | None) -> None:
        self.negative.setdefault(name, []).append(negative_ttl(response))

    def negative_ttl(self, name: dns.name.Name) -> float | None:
        """The shortest negative TTL of name's answers; None when one had no SOA."""
        ttls = self.negative.get(name, [None])
        return None if None in ttls else min(t for t in ttls if t is not None)

    def additional_address(
        self, host: dns.name.Name, response: dns.message.Message | None
    ) -> str | None:
        """host's first IPv4 (else IPv6) address from the additional section of `response`,
        or from the zone copy."""
        if self.copy is not None and self.inside(host):
            return self.copy.address(host)
        if response is None:
            return None
        extra = [r for r in response.additional if r.name == host and r.rdtype in _ADDRESS_TYPES]
        if not extra:
            return None
        self.ttl = min([self.ttl] + [r.ttl for r in extra])
        return min((a.address for rrset in extra for a in rrset), key=_ip_order, default=None)

    def query_address(self, host: dns.name.Name) -> str | None:
        """host's first IPv4 (else IPv6) address, queried (A, then AAAA)."""
        rdatas: Iterable[Any] = self.query(host, "A") or self.query(host, "AAAA") or ()
        return min((a.address for a in rdatas), key=_ip_order, default=None)
