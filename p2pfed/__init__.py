"""p2pfed: serverless federated learning of multi-modal multi-task models among institutions.

``Node`` and ``NodeConfig`` are imported on first use: they bring torch, which the commands
that do not train (``p2pfed --help``, ``status``, ``invite`` …) never need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfed.node import Node, NodeConfig

__version__ = "0.1.0"

__all__ = ["Node", "NodeConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Node", "NodeConfig"):
        from p2pfed import node

        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
