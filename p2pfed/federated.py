"""A node that is a member of a real federation: membership records drive its topology.

:class:`FederatedNode` is the sans-IO :class:`~p2pfed.node.Node` plus a
:class:`~gossip.membership.MembershipView`.  Membership records travel in *bundles* (a fresh
signed envelope whose body lists long-lived signed records), so a member's join signed weeks
ago can still be relayed without tripping the clock-skew check.  Every new record is kept in the
ledger; the overlay and each component's mixing weights are recomputed from the members, and
the driver is told which neighbours to keep connections to.  The view's task catalogue
(:mod:`gossip.taskcat`) takes effect at the next round boundary, with a ``catalogue`` entry.
"""

from __future__ import annotations

import logging
from typing import Any

import networkx as nx

from gossip.admission import JOIN_REQUEST, admit, make_join_request
from gossip.envelope import MAX_ENVELOPE_BYTES, Envelope, open_envelope, packb, seal, unpackb
from gossip.errors import (
    LocalError,
    MalformedMessageError,
    RemoteError,
    UnauthorizedError,
)
from gossip.forget import (
    Forget,
    ForgetBook,
    ForgetMode,
    is_forget_record,
    make_forget,
    open_forget,
)
from gossip.identity import peer_id_from_public_key
from gossip.membership import MAX_CREDENTIALS, Join, Leave, MembershipView, make_leave
from gossip.overlay import holder_subgraph, overlay_graph
from p2pfed import kinds
from p2pfed.fedstore import pending_join
from p2pfed.journal import CatalogueApplied, ForgetRecord, JoinRequest, Membership, stored
from p2pfed.node import Action, Announce, ApplyForget, Broadcast, Connect, Node
from p2pfed.unlearning import FORGET_ENTRY, UNLEARNED_ENTRY, unlearning_status

log = logging.getLogger(__name__)

RECORDS = "records"
MEMBERSHIP_ENTRY = kinds.MEMBERSHIP
FORGET_RECORD_ENTRY = kinds.FORGET_RECORD
#: the newcomer's own join, kept until a member admits it (written by ``p2pfed join``)
JOIN_REQUEST_ENTRY = kinds.JOIN_REQUEST
BUNDLE_BUDGET = MAX_ENVELOPE_BYTES - 2048  # room for the envelope around the records
REFRESH_MS = 30_000
#: a newcomer asks its bootstrap members again after 2 s, 4 s, ... up to a minute
JOIN_RETRY_MIN_MS = 2_000
JOIN_RETRY_MAX_MS = 60_000
#: a member asking to join again gets our whole view at most this often
INTRODUCE_EVERY_MS = 10_000
MAX_INTRODUCED = 1024


def bundles(records: list[bytes], head: list[bytes] | None = None) -> list[list[bytes]]:
    """Split records into groups that fit in one envelope, each group starting with ``head``
    (the sender's credentials, so that every bundle shows on its own who may send it)."""
    head = head or []
    budget = BUNDLE_BUDGET - sum(len(raw) + 8 for raw in head)
    out: list[list[bytes]] = [[]]
    size = 0
    for raw in sorted(set(records) - set(head)):
        if len(raw) + 8 > budget:
            log.warning("a record of %d bytes does not fit a bundle; not sent", len(raw))
            continue
        if out[-1] and size + len(raw) + 8 > budget:
            out.append([])
            size = 0
        out[-1].append(raw)
        size += len(raw) + 8
    groups = [head + b for b in out if b]
    return groups or ([head] if head and records else [])


class FederatedNode(Node):
    """A federation member: the round protocol plus signed membership."""

    def __init__(self, *args: Any, view: MembershipView, degree: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if view.federation_id != self.federation_id:
            raise ValueError("the membership view is for another federation")
        self.view = view
        self.degree = degree
        self.left = False
        self._next_refresh: int | None = None
        self._connected: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self._member_keys: set[bytes] = set()
        self._member_ids: frozenset[str] = frozenset()
        #: a newcomer's bootstrap members, asked for admission until one grants it
        self._bootstrap: tuple[str, ...] = ()
        self._next_join_try: int | None = None
        self._join_tries = 0
        #: when each newcomer that was a member already last got our view (a retry)
        self._introduced: dict[str, int] = {}
        #: signed forget requests: kept in the ledger and gossiped with the membership records
        self.forgets = ForgetBook(self.federation_id)
        #: the task catalogue in effect (the last ``catalogue`` entry; None: none yet)
        self.catalogue: CatalogueApplied | None = None
        self.catalogues: tuple[CatalogueApplied, ...] = ()  # applied since start, in order

    # ---------------------------------------------------------------- inspection
    def members(self) -> list[str]:
        return [m.peer_id for m in self.view.members().values()]

    def is_member(self) -> bool:
        return self.identity.public_key in self.view.members()

    def standing(self) -> str:
        """Where this node stands: ``member``; ``joining`` (its join request waits for a
        member to admit it); ``left`` (its own leave record); ``removed`` (an admin's); or
        ``not a member`` (none of these: say, an admission that no longer counts)."""
        me = self.identity.public_key
        if me in self.view.members():
            return "member"
        if pending_join(self.ledger, self.view, me) is not None:
            return "joining"
        leaves = self.view.leaves_of(me)
        if leaves:
            return "left" if leaves[-1][2] == me else "removed"
        return "not a member"

    def forget_requested(self, peer_id: str) -> bool:
        """Has a request to forget ``peer_id`` been made (here or by another member)?"""
        return peer_id in self.forgotten() or any(
            peer_id_from_public_key(r.target) == peer_id for r in self.forgets.requests())

    def serves(self, peer: str) -> bool:
        """May ``peer`` use our streams and fetch our payloads: a member, not forgotten (and,
        while we are waiting to be admitted, the bootstrap members we asked)."""
        if peer in self._bootstrap and self.identity.peer_id not in self._member_ids:
            return True
        return peer in self._member_ids and peer not in self.forgotten()

    def accepts_broadcast(self, origin: str, data: bytes, now_ms: int) -> bool:
        """Gossip validation: relay only fresh records bundles signed by a current member.

        Cheap enough for every gossiped message (one signature check); what it accepts is
        checked again in full by :meth:`receive`.
        """
        try:
            env = open_envelope(data, federation_id=self.federation_id, now_ms=now_ms,
                                max_skew_ms=self.config.max_skew_ms)
        except RemoteError:
            return False
        return env.kind == RECORDS and env.sender_id == origin and self.serves(origin)

    def overlay_neighbours(self) -> list[str]:
        return sorted(p for p, _ in self._connected)

    def status(self) -> dict[str, Any]:
        """The federation member's status: :func:`~p2pfed.node.status_of` and the view."""
        from p2pfed.node import status_of

        members = self.view.members()
        node = status_of(self)
        return {
            "peer_id": node["peer_id"],
            "federation": self.view.genesis.name,
            "federation_id": self.federation_id.hex(),
            "member": self.identity.public_key in members,
            "standing": self.standing(),
            "forgotten": self.peer_id in self.forgotten(),
            "rounds_halted": self.halted,
            "members": len(members),
            "neighbours": self.overlay_neighbours(),
            "components": node["components"],
            "rejected": node["rejected"],
            "unlearning": self.unlearning_status(),
            "storage": node["storage"],
            "catalogue": self.catalogue_status(),
        }

    def catalogue_status(self) -> dict[str, Any]:
        """The task catalogue in effect: its version, digest and tasks."""
        cat = self.catalogue
        if cat is None:
            return {"version": 0, "digest": "", "tasks": {}}
        return {"version": cat.version, "digest": cat.digest.hex(),
                "tasks": {n: dict(t) for n, t in sorted(cat.tasks.items())}}

    def unlearning_status(self) -> list[dict[str, Any]]:
        """Each forget request applied: mode, what it rolled back, progress of its re-run."""
        rows = unlearning_status([*self.ledger.entries(FORGET_ENTRY),
                                  *self.ledger.entries(UNLEARNED_ENTRY)])
        for row in rows:
            pending = self.unlearning().get(row["target"], [])
            row["replaying"] = {c: list(self.replaying(c) or ()) for c in pending}
        return rows

    # ---------------------------------------------------------------- events
    def restore(self) -> dict[str, int]:
        restored = super().restore()
        for entry in self._journal.read(ForgetRecord):
            try:
                self.forgets.add_bytes(entry.record.record, self.view)
            except RemoteError as exc:
                log.warning("ignoring a forget record in the ledger: %s", exc)
        last = self.ledger.last(CatalogueApplied.KIND)
        self.catalogue = stored(last, CatalogueApplied).record if last is not None else None
        return restored

    def add_task_record(self, raw: bytes, now_ms: int) -> list[Action]:
        """A task-catalogue record signed here (``p2pfed task``): check it as any peer would,
        keep it (durable) and spread it; it takes effect at the next round boundary."""
        try:
            if not self.view.add_bytes(raw, now_ms=now_ms):
                return []  # known already: a replay changes nothing
        except RemoteError as exc:
            raise LocalError(f"the task record is refused: {exc} ({exc.code})") from exc
        self._journal.write(Membership(raw), now_ms, durable=True)
        return self._spread([raw], now_ms) + self._apply_catalogue(now_ms, "", 0, idle=True)

    def _apply_catalogue(self, now_ms: int, component: str, round_: int, *,
                         idle: bool = False) -> list[Action]:
        """At a round boundary (or, ``idle``, when no round runs here): take the view's task
        catalogue if it changed, with a ``catalogue`` entry in the ledger."""
        if idle and self.components and self._started:
            return []  # the next round boundary will
        cat = self.view.task_catalogue()
        if cat.digest == (self.catalogue.digest if self.catalogue else b"") or not cat.version:
            return []
        round_ = max((self.round_of(c) for c in self.components  # (live, never a re-run's)
                      if self.replaying(c) is None), default=round_)
        self.catalogue = CatalogueApplied(
            cat.version, cat.digest, {n: t.to_status() for n, t in cat.tasks.items()},
            tuple(str(i) for i in cat.ignored), component, round_)
        self._journal.write(self.catalogue, now_ms)
        self.catalogues = (*self.catalogues, self.catalogue)
        log.info("task catalogue version %d in effect: %s active", cat.version,
                 ", ".join(cat.active()) or "no task")
        return []

    def _complete_round(self, name: str, now_ms: int) -> list[Action]:
        actions = super()._complete_round(name, now_ms)
        return actions + self._apply_catalogue(now_ms, name, self.round_of(name))

    def request_forget(self, peer_id: str, mode: str, reason: str, now_ms: int) -> list[Action]:
        """Sign a request to forget ``peer_id``'s data, apply it here and gossip it.

        Only the member itself or an admin may ask; anyone else gets a :class:`LocalError`
        (and nothing is sent).
        """
        keys = {peer_id_from_public_key(raw_key): raw_key for raw_key in self.view.ever_joined()}
        target = keys.get(peer_id)
        if target is None:
            raise LocalError(f"{peer_id} has never been a member of this federation")
        if self.forget_requested(peer_id):
            return []  # asked (and applied) already: a new request would change nothing
        try:
            forget = Forget(target, ForgetMode(mode),
                            max((self.round_of(c) for c in self.components), default=0), reason)
        except ValueError as exc:
            raise LocalError(f"bad forget request: {exc}") from exc
        env = make_forget(self.identity, self.federation_id, forget, now_ms, self._seq.next())
        try:
            actions = self._accept_forget(env.to_bytes(), now_ms)
        except RemoteError as exc:
            raise LocalError(str(exc)) from exc
        return actions + self._spread([env.to_bytes()], now_ms)

    def _spread(self, records: list[bytes], now_ms: int) -> list[Action]:
        """Records everyone should learn soon: gossiped, and sent to our neighbours directly."""
        neighbours = tuple(p for p, _ in self._connected)
        actions: list[Action] = []
        for body in self._bundle_envelopes(records, now_ms):
            actions.append(Broadcast(body))
            if neighbours:
                actions.append(Announce(neighbours, body))
        return actions

    def _accept_forget(self, raw: bytes, now_ms: int) -> list[Action]:
        """A signed forget record (ours or gossiped): keep it and apply it once per member."""
        if not self.forgets.add_bytes(raw, self.view):
            return []  # known already, or it loses to the request held for its member
        self._journal.write(ForgetRecord(raw), now_ms, durable=True)
        forget, _env = open_forget(raw, self.federation_id)
        target = peer_id_from_public_key(forget.target)
        if target in self.forgotten():
            return []  # applied once already (a later request only wins the book)
        return [ApplyForget(target, forget.mode.value)]

    def start(self, now_ms: int) -> list[Action]:
        standing = self.standing()
        if standing in ("left", "removed"):  # its rounds would serve no one
            self.left = True
            self.halt()
            log.warning("this node has %s %s: it runs no rounds (join again with a new "
                        "invite: 'p2pfed join TOKEN')", standing, self.view.genesis.name)
        actions = self._membership_changed() + self._apply_catalogue(now_ms, "", 0)
        self._next_refresh = now_ms + REFRESH_MS
        return actions + self._own_bundle_broadcast(now_ms) + super().start(now_ms)

    def introduce(self, peers: list[str], now_ms: int) -> list[Action]:
        """Send our whole view to ``peers``; a newcomer (not a member yet) instead asks them,
        its invite's bootstrap members, to admit it, and asks again until one does."""
        if not self.is_member():
            self._bootstrap = tuple(peers)
            self._join_tries = 0
            return self._request_admission(now_ms)
        return [Announce(tuple(peers), b) for b in self._bundle_envelopes(
            list(self.view.records()), now_ms)]

    def _request_admission(self, now_ms: int) -> list[Action]:
        entry = self.ledger.last(JoinRequest.KIND)
        raw = stored(entry, JoinRequest).record.record if entry is not None else None
        if raw is None or not self._bootstrap or self.left or self._stale(raw):
            self._next_join_try = None
            return []
        delay = min(JOIN_RETRY_MAX_MS, JOIN_RETRY_MIN_MS << min(self._join_tries, 8))
        self._join_tries += 1
        self._next_join_try = now_ms + delay
        env = make_join_request(self.identity, self.federation_id, raw, now_ms, self._seq.next())
        return [Announce(self._bootstrap, env.to_bytes())]

    def _stale(self, join: bytes) -> bool:
        """A join request older than our latest membership record (we left since)."""
        try:
            epoch = Join.from_body(self.view.open(join).body).epoch
        except RemoteError:
            return True
        return self.view.latest_epoch(self.identity.public_key) >= epoch

    def tick(self, now_ms: int) -> list[Action]:
        actions: list[Action] = []
        if self._next_join_try is not None and now_ms >= self._next_join_try:
            actions += self._request_admission(now_ms) if not self.is_member() else []
        if self._next_refresh is not None and now_ms >= self._next_refresh:
            self._next_refresh = None if self.left else now_ms + REFRESH_MS
            if not self.left:
                actions += self._own_bundle_broadcast(now_ms)
        actions += self._apply_catalogue(now_ms, "", 0, idle=True)
        return actions + super().tick(now_ms)

    def next_deadline(self) -> int | None:
        times = [t for t in (super().next_deadline(), self._next_refresh, self._next_join_try)
                 if t is not None]
        return min(times) if times else None

    def leave(self, reason: str, now_ms: int) -> list[Action]:
        """Sign a leave record, tell everyone, and stop mixing and starting rounds.  A node
        that is not a member (it left already, or was never admitted) signs nothing."""
        if not self.is_member():
            return []
        me = self.identity.public_key
        epoch = max(self.view.latest_epoch(me), 0)
        env = make_leave(self.identity, self.federation_id, Leave(me, epoch, reason), now_ms,
                         self._seq.next())
        self.view.add(env)
        self._store(env.to_bytes(), now_ms)
        self.left = True
        self._next_refresh = None
        self.halt()
        log.info("left %s: no new rounds start", self.view.genesis.name)
        return self._spread([env.to_bytes()], now_ms) + self._membership_changed()

    # ---------------------------------------------------------------- internals
    def _other_record(self, peer: str, env: Envelope, now_ms: int) -> list[Action]:
        if env.kind == JOIN_REQUEST:
            return self._on_join_request(peer, env, now_ms)
        if env.kind != RECORDS:
            raise MalformedMessageError(f"unexpected record kind {env.kind!r}", peer=peer)
        records = unpackb(env.body)
        if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
            raise MalformedMessageError("a records bundle must be a list of records", peer=peer)
        known_before = set(self.view.members())
        stored_before = self.view.records()
        if self.is_member() and env.sender not in known_before:
            self._admit_sender(peer, env.sender, records)
        self._replay.check(env.sender, env.seq, env.timestamp_ms)
        forget_actions: list[Action] = []
        for raw in records:
            try:
                if is_forget_record(raw):
                    forget_actions += self._accept_forget(raw, now_ms)
                else:
                    self.view.add_bytes(raw)
            except RemoteError as exc:
                self._reject(peer, exc)
        # what the view now holds that it did not: the new records, and any record that was
        # waiting for its anchor and came in with it
        new = sorted(self.view.records() - stored_before)
        for raw in new:
            self._store(raw, now_ms)
        members = self.view.members()
        if not new:
            return forget_actions
        actions = forget_actions + self._membership_changed()
        newcomers = [m.peer_id for pk, m in members.items()
                     if pk not in known_before and pk != self.identity.public_key]
        if newcomers and self.is_member():
            # They may know little of the federation yet: give them our whole view.
            actions += self.introduce(newcomers, now_ms)
        return actions

    def _admit_sender(self, peer: str, sender: bytes, records: list[bytes]) -> None:
        """A bundle from a key that is not a member here.  Its first records should be the
        sender's credentials (see :meth:`MembershipView.credentials`): they are checked in a
        view of their own, and only the chain that makes the sender a member is kept; unless
        it does, nothing of the bundle is kept and it is refused whole."""
        scratch = MembershipView(self.view.genesis)
        for raw in records[:MAX_CREDENTIALS]:
            try:
                if not is_forget_record(raw):
                    scratch.add_bytes(raw)
            except RemoteError:
                continue
        chain = scratch.credentials(sender)
        for raw in chain:
            self.view.add_bytes(raw)  # verified once more: cheap, at most a few records
        if not chain or not self.view.is_member(sender):  # (a member shows its credentials)
            raise UnauthorizedError(f"{peer} sent records but is not a member", peer=peer)

    def _on_join_request(self, peer: str, env: Envelope, now_ms: int) -> list[Action]:
        """A newcomer asks us to admit it (see :mod:`gossip.admission`)."""
        admission = admit(self.view, self.identity, env, now_ms, self._seq.next())
        if admission is None:  # a retry after an admission it has not heard of
            last = self._introduced.get(peer)
            if last is not None and now_ms - last < INTRODUCE_EVERY_MS:
                return []
            self._introduced[peer] = now_ms
            while len(self._introduced) > MAX_INTRODUCED:
                self._introduced.pop(next(iter(self._introduced)))
            return self.introduce([peer], now_ms)
        raw = admission.to_bytes()
        self.view.add_bytes(raw, now_ms=now_ms)
        self._store(raw, now_ms)
        log.info("admitted %s into %s", peer, self.view.genesis.name)
        actions = self._membership_changed()
        # the newcomer first gets its admission and our credentials, in a bundle of their own
        first = self._bundle_envelopes([raw], now_ms)
        actions += [Broadcast(b) for b in first] + [Announce((peer,), b) for b in first]
        return actions + self.introduce([peer], now_ms)

    def _store(self, raw: bytes, now_ms: int) -> None:
        self._journal.write(Membership(raw), now_ms)

    def _bundle_envelopes(self, records: list[bytes], now_ms: int) -> list[bytes]:
        head = self.view.credentials(self.identity.public_key)
        return [
            seal(self.identity, kind=RECORDS, federation_id=self.federation_id,
                 seq=self._seq.next(), timestamp_ms=now_ms, body=packb(group)).to_bytes()
            for group in bundles(records, head)
        ]

    def _own_bundle_broadcast(self, now_ms: int) -> list[Action]:
        mine = self.view.records_about(self.identity.public_key)
        # so that members who were away learn of them:
        mine += sorted(self.forgets.records()) + sorted(self.view.task_records())
        return [Broadcast(b) for b in self._bundle_envelopes(mine, now_ms)] if mine else []

    def _membership_changed(self) -> list[Action]:
        members = self.view.members()
        self._member_ids = frozenset(m.peer_id for m in members.values())
        me = self.identity.public_key
        if me not in members:
            if self._member_keys and not self.halted:  # it was a member: an admin removed it
                log.warning("removed from %s by an admin: no new rounds start",
                            self.view.genesis.name)
                self.halt()
            self.set_topology(nx.Graph(), {})
            self._connected = ()
            return []
        self._next_join_try = None  # admitted
        keys = list(members)
        if set(keys) != self._member_keys:
            # a new member brings its own state: track consensus from this view on
            self._member_keys = set(keys)
            self.reset_disagreement()
        graph = overlay_graph(self.federation_id, keys, self.degree)
        holders = {c: self.view.holders(c) for c in self.components}
        for hs in holders.values():
            graph.add_edges_from(holder_subgraph(graph, hs).edges)
        ids = {pk: peer_id_from_public_key(pk) for pk in keys}
        self.set_topology(nx.relabel_nodes(graph, ids),
                          {c: [ids[pk] for pk in hs] for c, hs in holders.items()})
        wanted = set(graph.neighbors(me))
        for c in self.components:
            wanted |= {pk for pk in keys if ids[pk] in self.neighbours_of(c)}
        self._connected = tuple(sorted((ids[pk], members[pk].addresses) for pk in wanted))
        return [Connect(self._connected)]


def load_view_from_ledger(view: MembershipView, entries: list[dict[str, Any]]) -> int:
    """Re-add membership records kept in the ledger; returns how many were added."""
    added = 0
    for body in entries:
        raw = body.get("record")
        if isinstance(raw, bytes):
            try:
                added += view.add_bytes(raw)
            except RemoteError as exc:
                log.warning("ignoring an invalid membership record in the ledger: %s", exc)
    return added
