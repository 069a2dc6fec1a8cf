"""The node's part of ``p2pfed status``: the one builder (see ``docs/status.schema.json``)."""

from __future__ import annotations

from typing import Any

from p2pfed.node._node import Node


def component_status(node: Node, name: str) -> dict[str, Any]:
    """One component's part of ``p2pfed status`` (see ``docs/status.schema.json``)."""
    history = node.disagreement_of(name)
    return {"round": node.round_of(name), "phase": node.phase_of(name).value,
            "neighbours": list(node.neighbours_of(name)),
            "mixing": node.rule_of(name),
            "consensus_distance": history,
            "privacy": node.privacy_of(name),
            "rounds_since_view_change": len(history)}


def status_of(node: Node) -> dict[str, Any]:
    """The node's part of ``p2pfed status`` (JSON-friendly): the one builder that the daemon
    (through :meth:`p2pfed.federated.FederatedNode.status`), the simulator and tests use."""
    return {
        "peer_id": node.peer_id,
        "components": {name: component_status(node, name) for name in sorted(node.components)},
        "rejected": dict(node.rejected),
        "storage": node.storage(),
    }
