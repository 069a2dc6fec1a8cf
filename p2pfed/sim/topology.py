"""Declarative topology files (``topologies/*.toml``) for the simulator and the tests.

A file names a graph, which nodes hold which components, and an optional churn schedule::

    name = "ring-16"
    [graph]
    kind = "ring"          # ring | torus | small-world | random-regular | star | complete
    n = 16                 # | edges | hierarchical
    [components]
    backbone = "all"       # "all", or a list of node names and/or hierarchical group names
    [[churn]]
    round = 100
    action = "leave"       # leave | join | fail-link | restore-link
    node = "node-3"        # or: link = ["node-1", "node-2"]

Graph parameters: ``ring``/``star``/``complete``: ``n``; ``torus``: ``rows``, ``cols``;
``small-world``: ``n``, ``k``, ``p``, ``seed``; ``random-regular``: ``n``, ``d``, ``seed``;
``edges``: ``nodes`` and ``edges`` (pairs of names); ``hierarchical``: ``[[graph.levels]]`` with
``group``, ``count`` (first level) or ``per_parent``, and ``connect`` (how siblings under one
parent are linked: ``complete``, ``ring`` or ``none``).  Nodes are named ``node-0`` … unless the
kind names them (hierarchical: ``institution-0``, ``instructor-0-1``, ``student-0-1-2``).
A node that first appears in a ``join`` event is absent until then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from gossip.catalog import ComponentSpec
from gossip.errors import ConfigError
from p2pfed.config import read_toml

CHURN_ACTIONS = ("leave", "join", "fail-link", "restore-link")
MAX_NODES = 4096
#: what a topology file may hold: its tables' keys, and ``[graph]``'s per kind
TOP_KEYS = frozenset({"name", "description", "graph", "components", "churn"})
GRAPH_KEYS = {
    "ring": {"n"}, "star": {"n"}, "complete": {"n"}, "torus": {"rows", "cols"},
    "small-world": {"n", "k", "p", "seed"}, "random-regular": {"n", "d", "seed"},
    "edges": {"nodes", "edges"}, "hierarchical": {"levels"},
}
LEVEL_KEYS = frozenset({"group", "count", "per_parent", "connect"})
CHURN_KEYS = frozenset({"round", "action", "node", "link"})


def _only(table: dict[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    """ConfigError naming the keys of ``table`` not in ``allowed`` (a typo, most likely)."""
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where} has unknown key(s): {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(allowed))})")


@dataclass(frozen=True)
class ChurnEvent:
    round: int
    action: str
    node: str = ""
    link: tuple[str, str] = ("", "")


@dataclass(frozen=True)
class Topology:
    name: str
    graph: nx.Graph
    nodes: tuple[str, ...]
    groups: dict[str, str]  # node -> group ("" when the kind has no groups)
    holders: dict[str, tuple[str, ...]]  # component -> holders, in node order
    churn: tuple[ChurnEvent, ...]
    description: str = ""

    def components_of(self, node: str) -> list[str]:
        return sorted(c for c, hs in self.holders.items() if node in hs)

    def initially_absent(self) -> frozenset[str]:
        """Nodes whose first churn event is a join."""
        first: dict[str, str] = {}
        for ev in sorted(self.churn, key=lambda e: e.round):
            if ev.node and ev.node not in first:
                first[ev.node] = ev.action
        return frozenset(n for n, a in first.items() if a == "join")


def _int(table: dict[str, Any], key: str, lo: int = 1, default: int | None = None) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"graph.{key} must be an integer >= {lo}, got {value!r}")
    if value > MAX_NODES:
        raise ConfigError(f"graph.{key}={value} is larger than {MAX_NODES}")
    return value


def _relabel(g: nx.Graph) -> nx.Graph:
    order = sorted(g.nodes)
    return nx.relabel_nodes(g, {old: f"node-{i}" for i, old in enumerate(order)})


def _hierarchical(table: dict[str, Any]) -> tuple[nx.Graph, dict[str, str]]:
    levels = table.get("levels")
    if not isinstance(levels, list) or not levels:
        raise ConfigError("hierarchical graph needs [[graph.levels]]")
    g: nx.Graph = nx.Graph()
    groups: dict[str, str] = {}
    parents: list[tuple[str, str]] = [("", "")]  # (name, index suffix)
    for depth, level in enumerate(levels):
        if not isinstance(level, dict) or not isinstance(level.get("group"), str):
            raise ConfigError(f"graph.levels[{depth}] needs a 'group' name")
        _only(level, LEVEL_KEYS - {"per_parent" if depth == 0 else "count"},
              f"[[graph.levels]] {depth}")
        group = level["group"]
        count = _int(level, "count" if depth == 0 else "per_parent")
        connect = level.get("connect", "complete")
        if connect not in ("complete", "ring", "none"):
            raise ConfigError(f"graph.levels[{depth}].connect must be complete, ring or none")
        children: list[tuple[str, str]] = []
        for parent, suffix in parents:
            siblings = [(f"{group}{suffix}-{i}", f"{suffix}-{i}") for i in range(count)]
            for name, _ in siblings:
                g.add_node(name)
                groups[name] = group
                if parent:
                    g.add_edge(parent, name)
            names = [name for name, _ in siblings]
            if connect == "complete":
                g.add_edges_from((a, b) for i, a in enumerate(names) for b in names[i + 1 :])
            elif connect == "ring" and len(names) > 1:
                g.add_edges_from(zip(names, names[1:] + names[:1], strict=True))
            children += siblings
        parents = children
        if g.number_of_nodes() > MAX_NODES:
            raise ConfigError(f"hierarchical graph has more than {MAX_NODES} nodes")
    return g, groups


def build_graph(table: dict[str, Any]) -> tuple[nx.Graph, dict[str, str]]:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in GRAPH_KEYS:
        raise ConfigError(f"unknown graph kind {kind!r}; one of {', '.join(GRAPH_KEYS)}")
    _only(table, GRAPH_KEYS[kind] | {"kind"}, f"[graph] of kind {kind}")
    seed = table.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError("graph.seed must be an integer")
    if kind == "ring":
        return _relabel(nx.cycle_graph(_int(table, "n", 3))), {}
    if kind == "torus":
        rows, cols = _int(table, "rows", 3), _int(table, "cols", 3)
        return _relabel(nx.grid_2d_graph(rows, cols, periodic=True)), {}
    if kind == "small-world":
        n, k = _int(table, "n", 4), _int(table, "k", 2)
        p = table.get("p", 0.1)
        if not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ConfigError("graph.p must be a probability")
        g = nx.connected_watts_strogatz_graph(n, k, float(p), tries=1000, seed=seed)
        return _relabel(g), {}
    if kind == "random-regular":
        n, d = _int(table, "n", 2), _int(table, "d", 1)
        if n * d % 2 or d >= n:
            raise ConfigError("random-regular needs n*d even and d < n")
        for attempt in range(100):
            g = nx.random_regular_graph(d, n, seed=seed + attempt)
            if nx.is_connected(g):
                return _relabel(g), {}
        raise ConfigError("could not draw a connected random regular graph")
    if kind == "star":
        return _relabel(nx.star_graph(_int(table, "n", 2) - 1)), {}
    if kind == "complete":
        return _relabel(nx.complete_graph(_int(table, "n", 1))), {}
    if kind == "edges":
        nodes, edges = table.get("nodes"), table.get("edges")
        if not isinstance(nodes, list) or not all(isinstance(x, str) for x in nodes):
            raise ConfigError("graph.nodes must be a list of names")
        if not isinstance(edges, list):
            raise ConfigError("graph.edges must be a list of [a, b] pairs")
        g = nx.Graph()
        g.add_nodes_from(nodes)
        for edge in edges:
            if not (isinstance(edge, list) and len(edge) == 2 and set(edge) <= set(nodes)):
                raise ConfigError(f"bad edge {edge!r}: both ends must be listed in graph.nodes")
            g.add_edge(*edge)
        return g, {}
    if kind == "hierarchical":
        return _hierarchical(table)
    raise ConfigError(f"unknown graph kind {kind!r}")


def _holders(
    value: Any, component: str, nodes: tuple[str, ...], groups: dict[str, str]
) -> tuple[str, ...]:
    if value == "all":
        return nodes
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"components.{component} must be \"all\" or a list of names")
    chosen: set[str] = set()
    for item in value:
        members = [n for n in nodes if groups.get(n) == item] or ([item] if item in nodes else [])
        if not members:
            raise ConfigError(f"components.{component}: {item!r} is neither a node nor a group")
        chosen.update(members)
    return tuple(n for n in nodes if n in chosen)


def _churn(items: Any, nodes: tuple[str, ...], graph: nx.Graph) -> tuple[ChurnEvent, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError("churn must be an array of tables ([[churn]])")
    events = []
    for i, item in enumerate(items):
        where = f"churn[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        _only(item, CHURN_KEYS, where)
        rnd, action = item.get("round"), item.get("action")
        if not isinstance(rnd, int) or rnd < 0:
            raise ConfigError(f"{where}.round must be a non-negative integer")
        if action not in CHURN_ACTIONS:
            raise ConfigError(f"{where}.action must be one of {', '.join(CHURN_ACTIONS)}")
        if action in ("leave", "join"):
            node = item.get("node")
            if node not in nodes:
                raise ConfigError(f"{where}.node {node!r} is not in the graph")
            events.append(ChurnEvent(rnd, action, node=node))
        else:
            link = item.get("link")
            if not (isinstance(link, list) and len(link) == 2 and graph.has_edge(*link)):
                raise ConfigError(f"{where}.link must name an edge of the graph")
            events.append(ChurnEvent(rnd, action, link=(link[0], link[1])))
    return tuple(sorted(events, key=lambda e: e.round))


def parse_topology(data: dict[str, Any], default_name: str = "topology") -> Topology:
    _only(data, TOP_KEYS, "the topology")
    graph_table = data.get("graph")
    if not isinstance(graph_table, dict):
        raise ConfigError("a topology needs a [graph] table")
    graph, groups = build_graph(graph_table)
    nodes = tuple(sorted(graph.nodes, key=_natural_key))
    comps = data.get("components", {"backbone": "all"})
    if not isinstance(comps, dict) or not comps:
        raise ConfigError("[components] must map component names to holders")
    holders: dict[str, tuple[str, ...]] = {}
    for component, value in comps.items():
        try:
            ComponentSpec.from_name(component)
        except ValueError as exc:
            raise ConfigError(f"components: {exc}") from exc
        holders[component] = _holders(value, component, nodes, groups)
        sub = graph.subgraph(holders[component])
        if not nx.is_connected(sub):
            raise ConfigError(
                f"the holders of {component} are not connected to each other in the graph, "
                "so they could never agree"
            )
    name = data.get("name", default_name)
    if not isinstance(name, str):
        raise ConfigError("name must be a string")
    description = data.get("description", "")
    return Topology(
        name=name,
        graph=graph,
        nodes=nodes,
        groups=groups,
        holders=holders,
        churn=_churn(data.get("churn"), nodes, graph),
        description=description if isinstance(description, str) else "",
    )


def load_topology(path: Path) -> Topology:
    data = read_toml(path, f"topology file {path}", f"topology file {path} does not exist")
    try:
        return parse_topology(data, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("-"))
