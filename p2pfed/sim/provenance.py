"""Provenance shares in the simulator: what each node reports, checked against the product of
the global mixing matrices.

Each node keeps, per component, a mass vector that it updates round by round
(:mod:`p2pfed.provenance`): training credits its own member, the mix combines the vectors with
the weights the parameters were mixed with.  The simulator sees every node's ledger, so it can
compute the same numbers another way, all at once: with ``D(t)`` the diagonal of the masses the
holders credited in round ``t`` (their ``local-update`` entries) and ``W(t)`` the global
mixing matrix of round ``t`` (row ``i``: node ``i``'s ``mix`` entry; a node that did not mix
in the round keeps its state, an identity row),

    A(T) = W(T-1) (… W(1) (W(0) D(0) + D(1)) …  + D(T-1))  = Σ_t Φ(T, t) D(t),

``Φ(T, t) = W(T-1)···W(t)``.  Row ``i`` of ``A(T)``, normalised, is what node ``i`` must
report.  Where a round was run again (exact unlearning) the entries of the newest forget epoch
stand for it, as they stand for the state.  The check is exact up to the order of float64
sums (1e-15 relative); ``provenance_max_error`` is the largest difference over every node,
component and member.

:func:`share_study` relates the shares to unlearning: with synthetic updates
(``SimConfig.updates``) the simulator runs the federation once more without each member j,
and once more with j's updates zero (``SimConfig.silent``: j still mixes and relays), and asks
whether node i's share of j ranks ‖x_i − x_i without j‖ and ‖x_i − x_i with j silent‖
(Spearman's ρ).  The second is j's contribution alone; the first adds what removing j from
the graph changes (its neighbours' mixing weights, the paths through it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from p2pfed.journal import LocalUpdate, Mix, stored
from p2pfed.ledger import Ledger
from p2pfed.lineage import tag
from p2pfed.provenance import Provenance


def _newest(ledger: Ledger, kind: type[Any], component: str) -> dict[int, Any]:
    """round -> the record of ``component`` of the newest forget epoch."""
    out: dict[int, Any] = {}
    for entry in ledger.entries(kind.KIND):
        rec = stored(entry, kind).record
        if rec.component == component and (rec.round not in out
                                           or rec.epoch >= out[rec.round].epoch):
            out[rec.round] = rec
    return out


def matrix_shares(ledgers: Mapping[str, Ledger], component: str,
                  peer_ids: Mapping[str, str],
                  rounds: int | None = None) -> dict[str, dict[str, float]]:
    """Each holder's shares of ``component`` after ``rounds`` rounds (None: up to the last
    round any holder mixed), from the ledgers alone (``ledgers``: holder name -> ledger;
    ``peer_ids``: every node's name -> peer id)."""
    names = sorted(ledgers)
    index = {peer_ids[n]: i for i, n in enumerate(names)}
    credits = {n: _newest(ledgers[n], LocalUpdate, component) for n in names}
    mixes = {n: _newest(ledgers[n], Mix, component) for n in names}
    if rounds is None:
        rounds = 1 + max((r for m in mixes.values() for r in m), default=-1)
    mass = np.zeros((len(names), len(names)))
    for t in range(rounds):
        for i, n in enumerate(names):
            up = credits[n].get(t)
            if up is not None and up.credit:
                mass[i, i] += up.credit
        w = np.eye(len(names))
        for i, n in enumerate(names):
            mix = mixes[n].get(t)
            if mix is None:
                continue
            own, weights = mix.share_weights or (mix.self_weight,
                                                 tuple(x.weight for x in mix.inputs))
            w[i, i] = own
            for ref, weight in zip(mix.inputs, weights, strict=True):
                if ref.peer in index:  # (an input from a node that is not a holder now)
                    w[i, index[ref.peer]] += weight
        mass = w @ mass
    out: dict[str, dict[str, float]] = {}
    for i, n in enumerate(names):
        total = mass[i].sum()
        out[n] = {} if total == 0 else {names[j]: float(mass[i, j] / total)
                                         for j in range(len(names)) if mass[i, j] > 0}
    return out


def reported_shares(prov: Provenance, peer_ids: Mapping[str, str]) -> dict[str, float]:
    """A node's vector as shares by node name (tags matched to the simulator's nodes)."""
    by_tag = {tag(p): n for n, p in peer_ids.items()}
    return {by_tag.get(t, f"unknown:{t.hex()}"): s for t, s in prov.shares().items() if s > 0}


def max_error(reported: Mapping[str, Mapping[str, float]],
              computed: Mapping[str, Mapping[str, float]]) -> float:
    """The largest difference between two sets of shares (node -> member -> share)."""
    err = 0.0
    for node in set(reported) | set(computed):
        a, b = reported.get(node, {}), computed.get(node, {})
        for member in set(a) | set(b):
            err = max(err, abs(a.get(member, 0.0) - b.get(member, 0.0)))
    return err


#: a node's shares are reported in full up to this many members, else its largest ones
REPORT_MEMBERS = 32


def provenance_report(nodes: Mapping[str, Any], members: set[str]) -> dict[str, Any] | None:
    """The report's ``provenance`` section: per component, each member node's shares as it
    reports them, and the check against :func:`matrix_shares` (None when nothing trained).
    ``nodes``: name -> :class:`~p2pfed.sim.nodes.SimNode` (ledgers open); ``members``: the
    nodes that end the run as members."""
    peer_ids = {n: sn.node.peer_id for n, sn in nodes.items()}
    section: dict[str, Any] = {}
    worst = worst_sum = 0.0
    components = sorted({c for sn in nodes.values() for c in sn.node.components})
    for comp in components:
        holders = {n: sn for n, sn in nodes.items() if comp in sn.node.components}
        reported = {n: reported_shares(holders[n].node.provenance_of(comp), peer_ids)
                    for n in sorted(holders) if n in members}
        if not any(reported.values()):
            continue
        computed = matrix_shares({n: sn.ledger for n, sn in holders.items()}, comp, peer_ids)
        error = max_error(reported, {n: computed[n] for n in reported})
        sums = max((abs(sum(s.values()) - 1.0) for s in reported.values() if s), default=0.0)
        flags = max(holders[n].node.provenance_of(comp).flags for n in reported)
        worst, worst_sum = max(worst, error), max(worst_sum, sums)
        section[comp] = {"max_error": error, "max_sum_error": sums, "flags": flags,
                         "shares": {n: _largest(s) for n, s in reported.items()}}
    if not section:
        return None
    return {"provenance_max_error": worst, "max_sum_error": worst_sum, "components": section}


def _largest(shares: Mapping[str, float]) -> dict[str, float]:
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[:REPORT_MEMBERS]
    return dict(sorted(ranked))


# ---------------------------------------------------------------- the share/unlearning study
#: (node i, member j) -> a number: node i's share of j, or how far removing j moves node i
Pairs = Mapping[tuple[str, str], float]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of ``a`` and ``b`` (ties: mean ranks), through scipy;
    None when it is undefined (fewer than 3 pairs, or either side constant)."""
    from scipy.stats import spearmanr  # type: ignore[import-untyped]  # (slow to import)

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _top(row: Mapping[str, float]) -> str:
    """The member with the largest value (ties: the first name in sorted order)."""
    return min(row, key=lambda j: (-row[j], j))


#: shares this close (relative) to a node's largest count as tied with it: on a symmetric
#: graph two members can hold the same share in exact arithmetic, and float rounding alone
#: would pick one of them
TIE = 1e-9


def _tied_top(row: Mapping[str, float]) -> set[str]:
    """The members whose value is the largest, up to :data:`TIE`."""
    top = max(row.values())
    return {j for j, v in row.items() if v >= top - TIE * abs(top)}


def share_study(shares: Pairs, displacement: Pairs, scaled: str) -> dict[str, Any]:
    """How well node i's share of member j ranks how far removing j (or j's updates: the
    displacement given) moves node i's state.

    Per node i, the rank correlation over the members j ≠ i (``per_node``; its mean and min);
    ``pooled``: over every pair (i, j); ``member_level``: of each member's mean share over the
    nodes against its mean displacement; and at the nodes i ≠ ``scaled``, the fractions where
    ``scaled`` has the largest share, where it has the largest displacement, and where the
    largest share and the largest displacement are the same member's (ties: the first name);
    with ties counted (:data:`TIE`), the fractions where the largest share is tied, and where
    the member with the largest displacement has the largest share or one tied with it."""
    nodes = sorted({i for i, _ in displacement})
    rows = {i: sorted(j for k, j in displacement if k == i) for i in nodes}
    per_node = {i: spearman([shares.get((i, j), 0.0) for j in rows[i]],
                            [displacement[i, j] for j in rows[i]]) for i in nodes}
    defined = [r for r in per_node.values() if r is not None]
    pairs = sorted(displacement)
    members = sorted({j for _, j in pairs})
    mean_share = [float(np.mean([shares.get((i, j), 0.0) for i in nodes if (i, j) in
                                 displacement])) for j in members]
    mean_disp = [float(np.mean([displacement[i, j] for i in nodes if (i, j) in displacement]))
                 for j in members]
    others = [i for i in nodes if i != scaled and rows[i]]
    top_share = {i: _top({j: shares.get((i, j), 0.0) for j in rows[i]}) for i in others}
    top_disp = {i: _top({j: displacement[i, j] for j in rows[i]}) for i in others}
    top_tied = {i: _tied_top({j: shares.get((i, j), 0.0) for j in rows[i]}) for i in others}
    count = max(len(others), 1)
    return {
        "per_node": per_node,
        "mean": float(np.mean(defined)) if defined else None,
        "min": min(defined) if defined else None,
        "undefined": sorted(i for i, r in per_node.items() if r is None),
        "pooled": spearman([shares.get(p, 0.0) for p in pairs],
                           [displacement[p] for p in pairs]),
        "member_level": spearman(mean_share, mean_disp),
        "scaled_largest_share": sum(top_share[i] == scaled for i in others) / count,
        "scaled_largest_displacement": sum(top_disp[i] == scaled for i in others) / count,
        "largest_share_is_largest_displacement":
            sum(top_share[i] == top_disp[i] for i in others) / count,
        "largest_share_tied": sum(len(top_tied[i]) > 1 for i in others) / count,
        "largest_displacement_has_largest_share":
            sum(top_disp[i] in top_tied[i] for i in others) / count,
    }
