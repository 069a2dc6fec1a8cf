"""The curated public API: changing it should be a deliberate act."""

from __future__ import annotations

import gossip
import p2pfed


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


def test_gossip_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, gossip, gossip.membership, gossip.transport.memory; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
