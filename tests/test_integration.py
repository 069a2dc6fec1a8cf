"""Real daemons as separate processes on 127.0.0.1 (slow; marked network)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from gossip.errors import LocalError
from p2pfed.cli import main
from p2pfed.runtime.localfed import COMPONENT, LocalFederation, run_local_federation

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_local_federation_of_four(tmp_path: Path) -> None:
    summary = run_local_federation(4, 3, tmp_path / "fed", timeout_s=240)
    assert summary["exit_codes"] == [0, 0, 0, 0]
    assert len({n["peer_id"] for n in summary["nodes"]}) == 4
    for node in summary["nodes"]:
        assert node["rounds_completed"] >= 3 and node["peers"] >= 1 and node["ledger_ok"]
        dist = node["consensus_distance"]
        # (the history restarts at each membership change; two members already agree exactly
        # after one Metropolis-Hastings round, so a round mixed before the others' updates came
        # in can read 0.0 first: the history must rise with the newcomers and fall again)
        assert len(dist) >= 3 and dist[-1] < max(dist)


def test_sigkill_mid_round_then_restart_rejoins_and_catches_up(tmp_path: Path) -> None:
    fed = LocalFederation(4, tmp_path, interval_s=0.5, timeout_s=2.0)

    def rounds(i: int) -> int:
        st = fed.status(i)
        return -1 if st is None else int(st["components"][COMPONENT]["round"])

    try:
        fed.setup()
        fed.wait_for(lambda: all(rounds(i) >= 3 for i in range(4)), 120, "4 daemons in step")
        assert fed.kill(3) == -signal.SIGKILL
        at_kill = {i: rounds(i) for i in range(3)}
        fed.wait_for(lambda: all(rounds(i) >= at_kill[i] + 4 for i in range(3)), 90,
                     "the other three to go on without node-3")
        fed.start(3)
        fed.wait_for(lambda: (st := fed.status(3)) is not None and st["peers"] >= 1
                     and st["member"] and st["rounds_completed"] >= 2, 120,
                     "node-3 to rejoin and mix again")
        assert rounds(3) >= max(at_kill.values()) + 4  # it caught up with the others
        status = fed.status(3)
        assert status is not None and status["ledger_ok"]
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    for i in range(4):
        assert main(["ledger", "verify", "--home", str(fed.home(i))]) == 0


def test_unlearn_between_real_daemons_and_every_ledger_verifies(tmp_path: Path) -> None:
    fed = LocalFederation(4, tmp_path, interval_s=0.5, timeout_s=2.0)
    try:
        fed.setup()

        def rounds(i: int) -> int:
            st = fed.status(i)
            return -1 if st is None else int(st["components"][COMPONENT]["round"])

        fed.wait_for(lambda: all(rounds(i) >= 4 for i in range(4)), 120, "4 daemons in step")
        st3 = fed.status(3)
        assert st3 is not None
        target = st3["peer_id"]
        # on a busy machine rounds may close on their timeout before node-3's state reaches a
        # node: wait until every other node has mixed it, so each has something to roll back
        fed.wait_for(lambda: all(_mixed_in(fed.home(i), target) for i in range(3)), 180,
                     "node-3's update to reach every other node")
        # a member that is not an admin may not ask to forget another one
        with pytest.raises(LocalError, match="only the member itself or an admin"):
            fed.cli("unlearn", target, "--home", str(fed.home(1)))
        # the admin (node-0 created the federation) asks; everyone rolls back and re-runs
        fed.cli("unlearn", target, "--mode", "exact", "--reason", "test",
                "--home", str(fed.home(0)))

        def done(i: int) -> bool:
            st = fed.status(i)
            return st is not None and [u["done"] for u in st["unlearning"]] == [True]

        fed.wait_for(lambda: all(done(i) for i in range(3)), 180, "the unlearning to finish")
        for i in range(3):
            st = fed.status(i)
            assert st is not None
            assert target not in st["components"][COMPONENT]["neighbours"]
            (u,) = st["unlearning"]
            assert u["target"] == target and u["rolled_back"] == [COMPONENT]
        fed.wait_for(lambda: all(rounds(i) >= 1 for i in range(3)), 30, "rounds to go on")
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}
    for i in range(4):
        assert main(["ledger", "verify", "--home", str(fed.home(i))]) == 0


def _mixed_in(home: Path, member: str) -> bool:
    """Whether a mix of the component at ``home`` holds ``member`` in its lineage."""
    from p2pfed.journal import Mix, read
    from p2pfed.ledger import read_entries

    return any(member in m.record.lineage for m in read(read_entries(home / "ledger.sqlite3"), Mix)
               if m.record.component == COMPONENT)


def _harvest(home: Path) -> tuple[list[bytes], bytes | None, bytes | None]:
    """What a stranger could have collected: every membership record a member holds (more than
    gossip would ever show it), an admission to copy the invite and proof from, and the digest
    of a payload the member serves."""
    from p2pfed.ledger import read_entries

    entries = read_entries(home / "ledger.sqlite3")
    records = [e.body["record"] for e in entries if e.kind == "membership"]
    admission = next((r for r in records if b"admit" in r[:40]), None)
    update = next((e.body["digest"] for e in entries if e.kind == "local-update"), None)
    return records, admission, update


def _input_ratio(home: Path, since_ms: int, until_ms: int) -> tuple[float, int]:
    """The share of neighbours' updates a node mixed between two times, and how many mixes."""
    from p2pfed.ledger import read_entries

    mixes = [e for e in read_entries(home / "ledger.sqlite3")
             if e.kind == "mix" and since_ms <= e.timestamp_ms <= until_ms]
    used = sum(len(e.body["inputs"]) for e in mixes)
    wanted = used + sum(len(e.body["missing"]) for e in mixes)
    return (used / wanted if wanted else 0.0), len(mixes)


async def _stall(stranger: Any, victim: str, addr: str, until: Any) -> int:
    """Keep 16 payload and 16 control streams open to ``victim``, each stalled after 10 bytes
    of its request, reconnecting when cut off; returns how many streams it got opened."""
    import trio
    from libp2p.peer.id import ID

    from gossip.errors import PeerUnreachableError
    from gossip.transport.libp2p import CONTROL_PROTOCOL, PAYLOAD_PROTOCOL

    opened = 0
    while not until.is_set():
        if victim not in stranger.connected_peers():
            try:
                await stranger.connect(addr)
            except PeerUnreachableError:
                await trio.sleep(0.5)
                continue
        for protocol in (PAYLOAD_PROTOCOL, CONTROL_PROTOCOL):
            for _ in range(16):
                try:
                    raw = await stranger._host.new_stream(ID.from_base58(victim), [protocol])
                    await raw.write(bytes(10))
                    opened += 1
                except Exception:  # refused, reset, banned: what the victim should do
                    break
        await trio.sleep(0.5)
    return opened


def test_strangers_get_nothing_from_real_daemons_and_cannot_starve_them(tmp_path: Path) -> None:
    """Against three real daemons: 17 throw-away identities keep 16 payload and 16 control
    streams each stalled on one member, while members go on mixing; then a stranger dials it and
    sends what it harvested (a join request carrying a member's invite and proof, the records
    bundle, a payload fetch, junk on the gossip topic).  It gets in nowhere and gets nothing."""
    import trio

    from gossip.admission import make_join_request
    from gossip.envelope import open_envelope, packb, seal
    from gossip.errors import PeerUnreachableError
    from gossip.identity import Identity
    from gossip.membership import Admission, Join, make_join
    from gossip.transport.libp2p import Libp2pTransport
    from p2pfed.federated import RECORDS

    fed = LocalFederation(3, tmp_path, interval_s=0.5, timeout_s=2.0)

    def rounds(i: int) -> int:
        st = fed.status(i)
        return -1 if st is None else int(st["rounds_completed"])

    try:
        fed.setup()
        fed.wait_for(lambda: all(rounds(i) >= 2 for i in range(3)), 120, "3 daemons in step")
        target = fed.status(1)
        assert target is not None
        fid = bytes.fromhex(target["federation_id"])
        topic = f"/p2pfed/{fid.hex()}/records"
        addr = target["listen"][0]
        victim = target["peer_id"]

        async def stall_attack() -> tuple[int, int, int]:
            strangers = [Libp2pTransport(Identity.generate(), topic=topic,
                                         listen_addrs=["/ip4/127.0.0.1/tcp/0"])
                         for _ in range(17)]
            until = trio.Event()
            opened: list[int] = []

            async def one(s: Libp2pTransport) -> None:
                async with s:
                    opened.append(await _stall(s, victim, addr, until))

            start = int(time.time() * 1000)
            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    for s in strangers:
                        nursery.start_soon(one, s)
                    await trio.sleep(12)
                    until.set()
            return start, int(time.time() * 1000), sum(opened)

        start, end, opened = trio.run(stall_attack)
        ratio, mixes = _input_ratio(fed.home(1), start + 2000, end)
        assert mixes >= 5 and ratio >= 0.9, (ratio, mixes, opened)

        records, admission, update = _harvest(fed.home(1))
        assert admission is not None and update is not None
        stranger = Identity.generate()

        async def harvest_attack() -> dict[str, object]:
            outcome: dict[str, object] = {}
            t = Libp2pTransport(stranger, topic=topic, listen_addrs=["/ip4/127.0.0.1/tcp/0"])
            async with t:
                (peer,) = t.add_bootstrap([addr])
                now = int(time.time() * 1000)
                env = open_envelope(admission, federation_id=fid, now_ms=0, max_skew_ms=1 << 62)
                inner = open_envelope(Admission.from_body(env.body).join, federation_id=fid,
                                      now_ms=0, max_skew_ms=1 << 62)
                stolen = make_join(stranger, fid, Join.from_body(inner.body), now, 1)
                request = make_join_request(stranger, fid, stolen.to_bytes(), now, 2)
                # the bundle also carries the stolen join itself (the attack that worked before
                # admissions: a join with a harvested invite, backdated inside its expiry)
                bundle = seal(stranger, kind=RECORDS, federation_id=fid, seq=3,
                              timestamp_ms=now, body=packb([stolen.to_bytes(), *records[:50]]))
                with trio.fail_after(60):
                    for message in (request.to_bytes(), bundle.to_bytes()):
                        try:
                            await t.send(peer, message)
                        except PeerUnreachableError as exc:
                            outcome["send_error"] = str(exc)
                    try:
                        outcome["payload"] = len(await t.fetch(peer, update, 1 << 30))
                    except PeerUnreachableError:
                        outcome["payload"] = None
                    received_before = t.stats.broadcasts_received
                    await t.broadcast(bundle.to_bytes())  # junk on the topic
                    await trio.sleep(3)
                    outcome["gossip_received"] = t.stats.broadcasts_received - received_before
            return outcome

        outcome = trio.run(harvest_attack)
        assert outcome["payload"] is None  # nothing by digest
        assert outcome["gossip_received"] == 0  # nothing of the federation's gossip
        before = {i: rounds(i) for i in range(3)}
        fed.wait_for(lambda: all(rounds(i) >= before[i] + 2 for i in range(3)), 90,
                     "rounds to go on")
        for i in range(3):
            st = fed.status(i)
            assert st is not None and st["members"] == 3 and st["member"]
        st1 = fed.status(1)
        assert st1 is not None
        assert sum(st1["rejected"].values()) >= 2  # the join request and the bundle
        assert st1["transport"]["refused_strangers"] >= 1  # payload streams of strangers
    finally:
        codes = fed.stop_all()
    assert codes == {0: 0, 1: 0, 2: 0}
