"""p2pfed's secure overlay layer: identities, signed envelopes, membership, transports.

No torch here: this layer only moves and checks signed bytes.
"""

from gossip.catalog import ComponentKind, ComponentSpec
from gossip.envelope import Envelope, ReplayGuard, Sequencer, digest, open_envelope, seal
from gossip.errors import LocalError, P2PFedError, RemoteError
from gossip.identity import Identity, load_identity, load_or_create_identity

__all__ = [
    "ComponentKind",
    "ComponentSpec",
    "Envelope",
    "Identity",
    "LocalError",
    "P2PFedError",
    "RemoteError",
    "ReplayGuard",
    "Sequencer",
    "digest",
    "load_identity",
    "load_or_create_identity",
    "open_envelope",
    "seal",
]
