"""The curated public API: changing it should be a deliberate act."""

from __future__ import annotations

import pytest

import gossip
import p2pfed
from gossip.errors import ConfigError


def test_gossip_api() -> None:
    assert sorted(gossip.__all__) == [
        "ComponentKind", "ComponentSpec", "Envelope", "Identity", "LocalError", "P2PFedError",
        "RemoteError", "ReplayGuard", "Sequencer", "digest", "load_identity",
        "load_or_create_identity", "open_envelope", "seal",
    ]
    for name in gossip.__all__:
        assert getattr(gossip, name) is not None


def test_p2pfed_api() -> None:
    assert sorted(p2pfed.__all__) == ["Node", "NodeConfig", "__version__"]
    from p2pfed.node import Node, NodeConfig

    assert p2pfed.Node is Node and p2pfed.NodeConfig is NodeConfig  # imported on first use
    assert all(getattr(p2pfed, name) is not None for name in p2pfed.__all__)


def test_p2pfed_and_its_config_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, p2pfed, p2pfed.config, p2pfed.cli; "
            "sys.exit(1 if {'torch', 'networkx', 'numpy'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_config_names_what_the_code_implements() -> None:
    """The configuration is a leaf: it names the mixing rules and data kinds itself."""
    from p2pfed import config, consensus
    from p2pfed.model import data

    assert set(config.MIXING_RULES) == set(consensus.RULES)
    assert data.SOURCE_KINDS is config.SOURCE_KINDS
    from p2pfed.model import fairness

    assert config.OBJECTIVES == fairness.OBJECTIVES
    # the ranges p2pfed.privacy.Policy enforces are checked without it
    for bad in ({"delta": 0.0}, {"sample_rate": 1.5}, {"budget": -1.0}):
        with pytest.raises(ConfigError, match="privacy: delta must be in"):
            config.Config.from_dict({"privacy": bad})


def test_gossip_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, gossip, gossip.membership, gossip.transport.memory; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
