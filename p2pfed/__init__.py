"""p2pfed: serverless federated learning of multi-modal multi-task models among institutions."""

from p2pfed.node import Node, NodeConfig

__version__ = "0.1.0"

__all__ = ["Node", "NodeConfig", "__version__"]
