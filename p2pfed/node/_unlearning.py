"""The unlearning planner: ledger entries in, a plan out; the node applies it.

Forgetting member ``T`` (see :mod:`p2pfed.unlearning` for the method and the ledger audit) is
planned here and applied by :meth:`p2pfed.node.Node.forget`:

* :func:`plan_forget`: which components ``T`` reached (and the ones trained with them), the
  latest round with a clean checkpoint common to all of them, and where each one re-runs to;
  :func:`forget_entry` is the durable ``forget`` ledger entry the plan becomes;
* :func:`plan_replay`: what a component re-running rounds takes from the ledger (the
  neighbours' clean updates, and in fast mode this node's own updates before the request);
* :func:`plan_resume`: after a restart, which components roll back again and which re-run;
* :func:`unlearned_entry`: the ledger entry that closes an unlearning.

Nothing here touches a component's state: functions read ledger entries (and stored payloads)
and return values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pfed.blobs import BlobStore
from p2pfed.codec import decode_payload
from p2pfed.components import FlatLayout
from p2pfed.ledger import LedgerEntry
from p2pfed.mixing import Memory
from p2pfed.node._replay import Contribution, Replay
from p2pfed.unlearning import FAST_STRIDE, is_clean

MODES = ("exact", "fast")


# ---------------------------------------------------------------- ledger queries
def rollback_round(
    entries: Iterable[LedgerEntry], rounds: Mapping[str, int], forgotten: Iterable[str],
) -> tuple[int, dict[str, dict[str, Any]]] | None:
    """The latest round at which every component in ``rounds`` has a clean checkpoint.

    ``rounds`` maps each component to roll back to its current round (a checkpoint after it is
    not a candidate).  Returns that round and, per component, the checkpoint entry's body (the
    latest one at that round), or None when there is no common clean round.
    """
    forgotten = set(forgotten)
    found: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in rounds}
    for entry in entries:
        if entry.kind != "checkpoint":
            continue
        body = entry.body
        c = body.get("component")
        if c in found and body["round"] <= rounds[c] and is_clean(body["lineage"], forgotten):
            found[c][body["round"]] = body
    common = set.intersection(*(set(v) for v in found.values())) if found else set()
    if not common:
        return None
    start = max(common)
    return start, {c: found[c][start] for c in rounds}


def contributions(
    entries: Iterable[LedgerEntry], component: str, start: int, until: int,
    forgotten: Iterable[str],
) -> dict[tuple[int, str], Contribution]:
    """Clean neighbour updates of ``component`` received for rounds ``start .. until-1``.

    A later entry for the same round and neighbour wins: after a restart in the middle of an
    unlearning, what the neighbours sent for the re-run is preferred to what they sent before.
    """
    forgotten = set(forgotten)
    out: dict[tuple[int, str], Contribution] = {}
    for entry in entries:
        body = entry.body
        if entry.kind != "contribution" or body.get("component") != component:
            continue
        rnd, sender = body["round"], body["sender"]
        if start <= rnd < until and sender not in forgotten and is_clean(body["lineage"],
                                                                           forgotten):
            out[(rnd, sender)] = Contribution(body["digest"], tuple(body["lineage"]),
                                              float(body.get("noise", 0.0)))
    return out


def own_updates(
    entries: Iterable[LedgerEntry], component: str, start: int, until: int, before: int,
) -> dict[int, tuple[bytes, bytes]]:
    """Per round, (state before training, state after) digests of this node's own updates."""
    out: dict[int, tuple[bytes, bytes]] = {}
    for entry in entries:
        if entry.index >= before:
            break
        body = entry.body
        if (entry.kind == "local-update" and body.get("component") == component
                and start <= body["round"] < until and body.get("start")):
            out[body["round"]] = (body["start"], body["digest"])
    return out


# ---------------------------------------------------------------- a forget request
@dataclass(frozen=True)
class ForgetPlan:
    """What forgetting ``target`` does to this node's components."""

    target: str
    mode: str
    #: components whose lineage holds the target: rolled back and re-run
    influenced: frozenset[str]
    #: every component re-run: the influenced ones and those trained with them
    rerun: frozenset[str]
    #: per re-run component, the round it re-runs to (where it is now)
    rounds: Mapping[str, int]
    #: the round rolled back to (None: no common clean checkpoint, the request fails)
    start: int | None
    #: per re-run component, the checkpoint entry's body to roll back to
    checkpoints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.start is not None

    @property
    def fed_only(self) -> list[str]:
        """Components re-run only to feed the others: their present state is put back."""
        return sorted(self.rerun - self.influenced)


def rerun_of(influenced: Iterable[str], trains: Collection[str],
             forward_deps: Mapping[str, Iterable[str]], components: Collection[str]) -> set[str]:
    """The influenced components and, transitively, those their training reads: re-training
    an influenced component trains these with it, so they re-run too."""
    rerun = set(influenced)
    grown = True
    while grown:
        extra = {d for c in rerun if c in trains
                 for d in forward_deps.get(c, ()) if d in components}
        grown = not extra <= rerun
        rerun |= extra
    return rerun


def plan_forget(
    target: str, mode: str, *, self_id: str, lineages: Mapping[str, Collection[str]],
    rounds: Mapping[str, int], trains: Collection[str],
    forward_deps: Mapping[str, Iterable[str]], checkpoints: Iterable[LedgerEntry],
    forgotten: Iterable[str],
) -> ForgetPlan:
    """Plan the forgetting of ``target`` from the components' lineages and current rounds and
    the ledger's ``checkpoint`` entries (``forgotten``: the members forgotten before).

    Forgetting this node itself (``self_id``) rolls nothing back: it leaves the mixing."""
    influenced = frozenset(c for c, lineage in lineages.items()
                           if target in lineage and target != self_id)
    rerun = frozenset(rerun_of(influenced, trains, forward_deps, lineages.keys()))
    until = {c: rounds[c] for c in rerun}
    found = rollback_round(checkpoints, until, {*forgotten, target}) if rerun else (0, {})
    if found is None:
        return ForgetPlan(target, mode, influenced, rerun, until, None)
    return ForgetPlan(target, mode, influenced, rerun, until, found[0], found[1])


def forget_entry(plan: ForgetPlan, epoch: int, keep: Mapping[str, Mapping[str, Any]],
                 components: Iterable[str]) -> dict[str, Any]:
    """The body of the durable ``forget`` ledger entry for a feasible ``plan`` (``keep``: the
    checkpoints of the components re-run only to feed the others)."""
    ck = plan.checkpoints
    return {
        "target": plan.target, "mode": plan.mode, "epoch": epoch, "start": plan.start,
        "components": {c: {"until": plan.rounds[c], "checkpoint": ck[c]["digest"],
                           "lineage": ck[c]["lineage"], **Memory.from_record(ck[c]).to_record(),
                           **({"keep": keep[c]} if c in keep else {})}
                       for c in sorted(plan.rerun)},
        "influenced": sorted(plan.influenced),
        "untouched": sorted(set(components) - plan.influenced),
    }


def unlearned_entry(forget: Mapping[str, Any]) -> dict[str, Any]:
    """The body of the ``unlearned`` entry that closes the unlearning ``forget`` began."""
    return {"target": forget["target"], "mode": forget["mode"], "epoch": forget["epoch"],
            "rolled_back": forget["influenced"], "untouched": forget["untouched"],
            "from_round": forget["start"]}


# ---------------------------------------------------------------- re-running rounds
def plan_replay(contributions_: Iterable[LedgerEntry], updates: Iterable[LedgerEntry] | None,
                name: str, target: str, mode: str, start: int, until: int, forget_index: int,
                *, forgotten: Iterable[str], stride: int = FAST_STRIDE,
                keep: Mapping[str, Any] | None = None) -> Replay:
    """The re-run of ``name``'s rounds ``start .. until-1``: the clean neighbour updates from
    the ledger's ``contribution`` entries and, when ``updates`` (``local-update`` entries) are
    given (fast mode, a trained component), this node's own updates before the request."""
    replay = Replay(target, mode, start, until, forget_index, keep=keep, stride=stride)
    replay.history = contributions(contributions_, name, start, until, forgotten)
    if updates is not None:
        replay.updates = own_updates(updates, name, start, until, forget_index)
    return replay


def stored_state(blobs: BlobStore, name: str, dig: bytes, layout: FlatLayout,
                 max_bytes: int) -> torch.Tensor:
    """The state ``name`` had in the payload stored under ``dig``."""
    return decode_payload(blobs.get(dig), max_bytes=max_bytes, expected_component=name,
                          expected_layout=layout).flat


def stored_update(blobs: BlobStore, name: str, replay: Replay, round_: int, layout: FlatLayout,
                  max_bytes: int) -> torch.Tensor | None:
    """This node's own training update of ``round_`` as it was made before the request."""
    kept = replay.updates.get(round_)
    if kept is None:
        return None
    before, after = (stored_state(blobs, name, d, layout, max_bytes) for d in kept)
    return after - before


# ---------------------------------------------------------------- after a restart
@dataclass(frozen=True)
class ResumeStep:
    """One component of an unlearning cut short by a stop."""

    name: str
    #: the checkpoint to roll back to again (None: one made since the request was loaded)
    rollback: Mapping[str, Any] | None
    #: the round its re-run goes to (None: the re-run is over)
    until: int | None
    keep: Mapping[str, Any] | None = None


def plan_resume(index: int, forget: Mapping[str, Any],
                latest: Mapping[str, tuple[int, Mapping[str, Any]]],
                components: Collection[str]) -> list[ResumeStep]:
    """How to carry on the unlearning of the ``forget`` entry at ledger ``index``, given the
    checkpoint each component was restored from (``latest``: name -> (ledger index, body))."""
    steps = []
    for name, plan in sorted(forget["components"].items()):
        if name not in components:
            continue
        ck_index, ck = latest.get(name, (-1, {}))
        rollback = None
        if ck_index < index:  # no checkpoint since the request: roll back again
            rollback = {"digest": plan["checkpoint"], "round": forget["start"],
                        "lineage": plan["lineage"], **Memory.from_record(plan).to_record()}
        round_ = (rollback or ck)["round"]
        steps.append(ResumeStep(name, rollback, plan["until"] if round_ < plan["until"] else None,
                                plan.get("keep")))
    return steps
