"""`p2pfed privacy epsilon`: the RDP accountant's ε for budget planning."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
import torch

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer, open_envelope
from gossip.errors import ConfigError
from gossip.identity import Identity
from p2pfed import exitcodes
from p2pfed.blobs import BlobStore
from p2pfed.cli import main
from p2pfed.components import FlatComponent
from p2pfed.config import Config
from p2pfed.ledger import Ledger
from p2pfed.node import Announce, Announcement, Node, NodeConfig, Train
from p2pfed.privacy import Policy, epsilon


def test_the_documented_example_matches_opacus_rdp(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["privacy", "epsilon", "--sigma", "1.5", "--sample-rate", "0.04", "--steps", "2250",
            "--delta", "1e-5", "--json"]
    assert main(args) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] == pytest.approx(7.3291, abs=0.01)
    assert main(args[:-1]) == exitcodes.OK
    assert "ε = 7.329" in capsys.readouterr().out


def test_more_noise_fewer_steps_or_rarer_sampling_spend_less() -> None:
    base = epsilon(1.5, 0.04, 2250, 1e-5).epsilon
    assert epsilon(3.0, 0.04, 2250, 1e-5).epsilon < base
    assert epsilon(1.5, 0.04, 500, 1e-5).epsilon < base
    assert epsilon(1.5, 0.01, 2250, 1e-5).epsilon < base
    assert epsilon(1.5, 0.04, 2250, 1e-3).epsilon < base
    assert epsilon(1.5, 0.04, 0, 1e-5).epsilon == 0.0


@pytest.mark.parametrize("args", [
    ["--sigma", "0", "--sample-rate", "0.1", "--steps", "10"],
    ["--sigma", "1", "--sample-rate", "1.5", "--steps", "10"],
    ["--sigma", "1", "--sample-rate", "0.1", "--steps", "-1"],
    ["--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0.9"],
    ["--sigma", "one", "--sample-rate", "0.1", "--steps", "10"],
    ["--sample-rate", "0.1", "--steps", "10"],
])
def test_wrong_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "epsilon", *args]) == exitcodes.USAGE
    assert capsys.readouterr().err


def test_the_library_call_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="sample rate"):
        epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        epsilon(1.0, 0.5, 10, 1.0)


# ---------------------------------------------------------------- private releases by a node
FED = b"P" * 32
DIM = 400_000


def _private_node(home: Path | None, policy: Policy, boot: int = 0, dim: int = 64,
                  seed: int = 7) -> Node:
    ident = Identity.from_seed(b"p" * 32)
    comp = FlatComponent.from_params(ComponentSpec.from_name("encoder.text"),
                                     {"w": torch.zeros(dim, dtype=torch.float64)})
    node = Node(ident, FED, {"encoder.text": comp},
                Ledger.open(home / "ledger.sqlite3" if home else None, ident),
                BlobStore(home / "blobs" if home else None),
                NodeConfig(trains=frozenset({"encoder.text"}), checkpoint_every=1,
                           privacy={"encoder.text": policy}, noise_seed=seed),
                Sequencer(boot))
    alone = nx.Graph()
    alone.add_node(ident.peer_id)
    node.set_topology(alone, {})
    return node


def _train_rounds(node: Node, rounds: int, step: float) -> list[object]:
    """Run ``rounds`` rounds alone, each local training adding ``step`` to every value (a lone
    round starts a round timeout after the one before: time moves on when all is quiet)."""
    now = node.next_deadline() or 0
    actions = list(node.set_round_limit(node.round_of("encoder.text") + rounds, now))
    actions += node.start(now)
    out: list[object] = []
    while actions or not node.idle():
        if not actions:
            now = max(now, node.next_deadline() or now)
            actions += node.tick(now)
            continue
        action = actions.pop(0)
        out.append(action)
        if isinstance(action, Train):
            node.components["encoder.text"].flat.add_(step)
            actions += node.local_update_done(action.component, action.round, now)
    return out


def test_every_release_is_clipped_and_its_noise_has_the_declared_variance() -> None:
    policy = Policy(clip=0.7, sigma=1.3)
    node = _private_node(None, policy, dim=DIM, seed=11)
    _train_rounds(node, 1, step=5.0)  # an update of norm 5 * sqrt(DIM), far above the clip
    released = node.components["encoder.text"].flat
    noise = torch.randn(DIM, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    clipped = released - noise * policy.noise_std
    assert float(torch.linalg.vector_norm(clipped)) <= policy.clip + 1e-9
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(policy.clip, rel=1e-9)
    # and the noise itself: a zero update released with fresh noise
    quiet = _private_node(None, policy, dim=DIM, seed=12)
    _train_rounds(quiet, 1, step=0.0)
    variance = float(quiet.components["encoder.text"].flat.var())
    assert variance == pytest.approx(policy.noise_std ** 2, rel=0.05)
    assert variance == pytest.approx(policy.noise_std ** 2, rel=0.01)  # (400k samples)


def test_announcements_declare_the_noise_and_the_ledger_the_epsilon() -> None:
    policy = Policy(clip=1.0, sigma=2.0)
    node = _private_node(None, policy)
    _train_rounds(node, 3, step=0.1)
    entries = list(node.ledger.entries("local-update"))
    assert [e.body["dp"]["releases"] for e in entries] == [1, 2, 3]
    assert entries[-1].body["dp"]["epsilon"] == pytest.approx(policy.spent(3))
    status = node.privacy_of("encoder.text")
    assert status is not None and status["epsilon_spent"] == pytest.approx(policy.spent(3))
    # with a neighbour, the announcement says how much noise the update carries
    other = Identity.from_seed(b"q" * 32).peer_id
    node.set_topology(nx.Graph([(node.peer_id, other)]),
                      {"encoder.text": [node.peer_id, other]})
    sent = [a for a in _train_rounds(node, 1, step=0.1) if isinstance(a, Announce)]
    env = open_envelope(sent[0].data, federation_id=FED, now_ms=0, max_skew_ms=1 << 40)
    ann = Announcement.from_body(env.body)
    assert ann.noise == pytest.approx(policy.noise_std)


def test_a_node_killed_right_after_sending_never_spends_less(tmp_path: Path) -> None:
    policy = Policy(clip=1.0, sigma=1.0)
    node = _private_node(tmp_path, policy)
    _train_rounds(node, 3, step=0.1)
    spent = node.privacy_of("encoder.text")
    assert spent is not None and spent["releases"] == 3
    node.ledger.close()  # killed: the release was announced, nothing else reached the disk
    reborn = _private_node(tmp_path, policy, boot=1)
    reborn.restore()
    again = reborn.privacy_of("encoder.text")
    assert again is not None and again["epsilon_spent"] >= spent["epsilon_spent"]
    assert again["releases"] == 3
    _train_rounds(reborn, 1, step=0.1)
    after = reborn.privacy_of("encoder.text")
    assert after is not None and after["epsilon_spent"] > spent["epsilon_spent"]


def test_an_exhausted_budget_stops_training_but_not_mixing() -> None:
    policy = Policy(clip=1.0, sigma=1.0, budget=Policy(1.0, 1.0).spent(2) + 1e-9)
    node = _private_node(None, policy)
    actions = _train_rounds(node, 4, step=0.1)
    assert sum(isinstance(a, Train) for a in actions) == 2
    assert node.round_of("encoder.text") == 4  # the rounds went on, untrained
    status = node.privacy_of("encoder.text")
    assert status is not None and status["exhausted"] and status["releases"] == 2
    assert status["epsilon_spent"] <= policy.budget


def test_privacy_levels_per_modality_from_the_config() -> None:
    cfg = Config.from_dict({"components": {"hold": ["encoder.text", "encoder.image",
                                                     "head.topic"]},
                            "privacy": {"budget": 4.0, "text": {"clip": 1.0, "sigma": 2.0},
                                        "image": {"clip": 0.5, "sigma": 0.8}}})
    policies = cfg.privacy.policies(["encoder.text", "encoder.image", "head.topic"])
    assert policies["encoder.text"].noise_std == pytest.approx(2.0)
    assert policies["encoder.image"].noise_std == pytest.approx(0.4)
    assert policies["head.topic"].sigma == 2.0  # no [privacy.shared]: the strictest level
    text = Config.from_dict({"privacy": {"text": {"clip": 1.0, "sigma": 2.0}}}).to_toml()
    assert "[privacy.text]" in text and "sigma = 2.0" in text
    with pytest.raises(ConfigError, match="clip and sigma"):
        Config.from_dict({"privacy": {"text": {"clip": 1.0}}})
    with pytest.raises(ConfigError, match="must be > 0"):
        Config.from_dict({"privacy": {"text": {"clip": 1.0, "sigma": 0.0}}})


def test_the_simulator_reports_the_privacy_spent_per_node_and_component() -> None:
    from p2pfed.sim.simulator import SimConfig, simulate
    from tests.test_education import TINY, school_topology

    policy = Policy(clip=1.0, sigma=1.5)
    report = simulate(SimConfig(school_topology(), workload="education", rounds=TINY.rounds,
                                seed=3, education=TINY, dp=policy, baselines=False))
    small = report["privacy"]["small-c"]
    assert set(small) == {"encoder.text.lora", "head.topic"}
    for row in small.values():
        assert row["releases"] == TINY.rounds
        assert row["epsilon_spent"] == pytest.approx(policy.spent(TINY.rounds))
        assert row["noise_multiplier"] == 1.5 and row["delta"] == 1e-5
    assert report["privacy"]["big-a"]["backbone"]["releases"] == TINY.rounds
