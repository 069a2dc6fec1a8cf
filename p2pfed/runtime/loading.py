"""Loading a daemon's node: its components (and trainer), the node's settings, a restore.

What a member holds is what its membership record names and what the federation's task
catalogue creates for it (:meth:`gossip.membership.MembershipView.holdings`): a head of a task
an admin added is built from its initial values, drawn from the federation id and its name, the
same on every member; the rest resume from their checkpoints.  The daemon loads a node at
start-up and again when a new catalogue gives this member components it lacks
(:func:`needs_rebuild`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trio

from gossip.envelope import Sequencer
from gossip.errors import ConfigError, LocalError
from gossip.identity import Identity
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.config import Config
from p2pfed.federated import FederatedNode
from p2pfed.home import BLOBS_DIR, CACHE_DIR, CONFIG_FILE
from p2pfed.ledger import Ledger
from p2pfed.mixing import rule as mixing_rule
from p2pfed.node import NodeConfig
from p2pfed.node._retention import RetentionPolicy

if TYPE_CHECKING:
    from gossip.membership import MembershipView
    from p2pfed.model.train import LocalTrainer

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 5


def initial_components(identity: Identity, holds: list[str], dim: int) -> dict[str, FlatComponent]:
    """Consensus workload: each held component starts from values only this node knows."""
    from gossip.catalog import ComponentSpec

    gen = torch.Generator().manual_seed(int.from_bytes(identity.public_key[:8], "little"))
    return {
        name: FlatComponent.from_params(
            ComponentSpec.from_name(name), {"weight": torch.randn(dim, generator=gen)}
        )
        for name in sorted(holds)
    }


def node_config(cfg: Config, trains: frozenset[str],
                deps: dict[str, frozenset[str]], period_ms: int = 0,
                gate: Callable[[int], bool] | None = None,
                loss_of: Callable[[str, int, int], float | None] | None = None) -> NodeConfig:
    """The node's settings from ``p2pfed.toml``: rounds, privacy per trained component, the
    mixing rule per component; DP noise seeded from the OS at each start.  ``period_ms``, the
    federation's round period (signed in its genesis), is a floor: a member may run rounds less
    often than the federation, never more often.  ``gate``: asked at each round's start too
    (with ``rounds.train_hours``) whether it may train (the memory cap: runtime/profile.py).
    ``loss_of``: the trainer's loss of each trained round (``[fairness] mixing = "loss"``)."""
    from p2pfed.node import TrainHours  # (rounds.train_hours: the daemon's schedule)
    hours = cfg.rounds.check()
    schedule: Callable[[int], bool] | None = TrainHours(*hours) if hours is not None else None
    if gate is not None:
        schedule = gate if schedule is None else _both(schedule, gate)
    interval_ms = int(cfg.rounds.interval_s * 1000)
    if interval_ms < period_ms:
        log.info("rounds.interval_s is %.3f s; the federation's round period is %.3f s: using it",
                 interval_ms / 1000, period_ms / 1000)
    privacy = cfg.privacy.policies(trains)
    rules = cfg.mixing.rules()
    plain = sorted(set(privacy) | {c for c in trains
                                   if not mixing_rule(rules.get(c, rules["*"])).uses_weights})
    if cfg.fairness.lean_of() and plain:
        log.warning("fairness.mixing = \"loss\": %s mix with the plain weights (under "
                    "differential privacy the loss is not released; a trimmed mean does not "
                    "use weights)", ", ".join(plain))
    return NodeConfig(
        round_timeout_ms=int(cfg.rounds.timeout_s * 1000),
        round_interval_ms=max(interval_ms, period_ms),
        checkpoint_every=CHECKPOINT_EVERY,
        trains=trains,
        forward_deps=deps,
        privacy=privacy,
        robust=rules,
        provenance=cfg.mixing.provenance,
        noise_seed=secrets.randbits(63),
        retention=RetentionPolicy(cfg.storage.unlearn_horizon_rounds, cfg.storage.max_bytes),
        participation=cfg.rounds.participation,
        make_up=cfg.rounds.make_up,
        objective=(cfg.fairness.objective, cfg.fairness.tilt),
        lean=cfg.fairness.lean_of(), loss_of=loss_of,
        # (the daemon's trainer trains more steps; with a sampling rate below 1 the accountant
        # counts the examples behind a release, so the update is scaled instead)
        make_up_by="update" if cfg.privacy.levels and cfg.privacy.sample_rate < 1 else "steps",
        schedule=schedule,
    )


def _both(first: Callable[[int], bool], second: Callable[[int], bool]) -> Callable[[int], bool]:
    return lambda now_ms: first(now_ms) and second(now_ms)


def holdings(identity: Identity, view: MembershipView, cfg: Config) -> list[str]:
    """What this node holds: its membership record's modules and what the task catalogue
    creates for them (``components.hold`` before it is a member).  Components the model
    cannot build (a catalogue task named like a built-in one with another pipeline) are left
    out, with an error logged, rather than stopping the daemon."""
    me = view.members().get(identity.public_key)
    if me is None:
        return list(cfg.components.hold)
    held = view.holdings(identity.public_key)
    if cfg.model.kind == "m3t" and held != me.modules:
        from p2pfed.model.local import model_spec

        try:
            model_spec(cfg, view.federation_id, view.task_catalogue()).check_holdings(
                sorted(held))
        except ConfigError as exc:
            log.error("the task catalogue gives this node %s, which the model cannot build "
                      "(%s): it holds what its membership record names",
                      ", ".join(sorted(held - me.modules)), exc)
            held = me.modules
    return sorted(held)


def needs_rebuild(node: FederatedNode, cfg: Config) -> list[str]:
    """The components this member holds (:func:`holdings`) and its node lacks: a catalogue
    task added since it was built; empty when there are none."""
    if not node.is_member():
        return []
    return sorted(set(holdings(node.identity, node.view, cfg)) - set(node.components))


async def load_node(home: Path, cfg: Config, identity: Identity, ledger: Ledger,
                    view: MembershipView, sequencer: Sequencer,
                    gate: Callable[[int], bool] | None = None
                    ) -> tuple[FederatedNode, LocalTrainer | None]:
    """The node over the ledger, its components (and trainer) resumed from checkpoints; a
    component without one (new here) starts from its initial values.  ``gate``: see
    :func:`node_config`."""
    me = view.members().get(identity.public_key)
    if me is not None and set(me.modules) != set(cfg.components.hold):
        log.warning("components.hold in p2pfed.toml (%s) differs from what this node "
                    "joined %s with (%s): the membership record counts; to hold other "
                    "components, leave and join again with a new invite",
                    ", ".join(sorted(cfg.components.hold)), view.genesis.name,
                    ", ".join(sorted(me.modules)))
    holds = holdings(identity, view, cfg)
    trainer = None
    if cfg.model.kind == "m3t":
        from p2pfed.model.agreement import check_at_start, record_base
        from p2pfed.model.device import about
        from p2pfed.model.local import build_trainer, follow_catalogue

        # the federation's text model, before anything is written (a refusal is a ConfigError)
        text = await trio.to_thread.run_sync(check_at_start, cfg, view.genesis, holds,
                                             home / CACHE_DIR)
        if text is not None:
            record_base(ledger, text, int(time.time() * 1000))

        # reads and pre-encodes the local data: off the event loop
        trainer = await trio.to_thread.run_sync(
            build_trainer, cfg, holds, view.federation_id, identity.public_key, home,
            view.task_catalogue())
        trainer.about = about(trainer.model.device, trainer.model.precision, text)
        components = trainer.components()
        trains = frozenset(trainer.trainable())
        deps = trainer.model.spec.forward_deps(holds)
    else:
        components = initial_components(identity, holds, cfg.components.dim)
        trains, deps = frozenset(), {}
    node = FederatedNode(
        identity, view.federation_id, components, ledger, BlobStore(home / BLOBS_DIR),
        node_config(cfg, trains, deps, view.genesis.round_period_ms, gate,
                    trainer.loss_of if trainer is not None else None), sequencer,
        view=view, degree=cfg.overlay.degree,
    )
    restored = node.restore()
    if restored:
        log.info("resumed from checkpoints: %s", restored)
    fresh = sorted(set(components) - set(restored))
    if restored and fresh:
        log.info("new here, from their initial values: %s", ", ".join(fresh))
    if trainer is not None:  # (its retired tasks: from the catalogues in the ledger)
        follow_catalogue(trainer, node)
    return node, trainer


async def reload_node(home: Path, cfg: Config, identity: Identity, ledger: Ledger,
                      view: MembershipView, sequencer: Callable[[], Sequencer],
                      gate: Callable[[int], bool] | None = None
                      ) -> tuple[FederatedNode, LocalTrainer | None, Config]:
    """:func:`load_node` again, to rebuild a running node; its ``[data]`` tables read anew
    from ``p2pfed.toml`` (so data for a task added meanwhile trains), unless they do not
    load: then the ones it ran with (logged).  Returns the config used too."""
    try:
        fresh = replace(cfg, data=Config.from_toml(home / CONFIG_FILE).data)
    except (LocalError, OSError) as exc:
        log.warning("p2pfed.toml not read again (%s): the [data] tables stay as they were",
                    exc)
        fresh = cfg
    if fresh.data != cfg.data:
        try:
            node, trainer = await load_node(home, fresh, identity, ledger, view, sequencer(),
                                            gate)
            return node, trainer, fresh
        except ConfigError as exc:
            log.warning("the [data] tables of p2pfed.toml are refused (%s): the node keeps the "
                        "ones it ran with", exc)
    node, trainer = await load_node(home, cfg, identity, ledger, view, sequencer(), gate)
    return node, trainer, cfg
