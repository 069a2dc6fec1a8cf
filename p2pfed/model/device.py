"""Where a member's model runs and in what precision (``[model] device`` and ``precision``).

The configuration only checks the words (:meth:`p2pfed.config.ModelSection.check_device`), so
that ``status`` and ``ledger`` read a config naming a GPU on a machine without one; whether
torch sees the device is checked here, when the daemon builds its model
(:func:`resolve_device`).

Whatever the device and precision, the parameters the optimiser updates stay float32, and what
a member mixes and sends is the float32 CPU buffer of each component
(:class:`~p2pfed.components.FlatComponent`): members on different devices, in different
precisions, mix exactly as before.  ``bf16`` runs the forward pass under bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from gossip.errors import ConfigError

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


def resolve_device(setting: str) -> torch.device:
    """The torch device ``[model] device = setting`` names on this machine: ``"auto"`` is the
    current CUDA device when torch sees one, else the CPU.  ConfigError, naming the setting
    and what torch sees, for a CUDA device torch does not see."""
    if setting == "cpu":
        return CPU
    available = torch.cuda.is_available()
    if setting == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else CPU
    count = torch.cuda.device_count() if available else 0
    index = int(setting.removeprefix("cuda:")) if setting.startswith("cuda:") else None
    if count == 0 or (index is not None and index >= count):
        if count == 0:
            built = torch.version.cuda
            sees = ("no CUDA device" if built else
                    "no CUDA device (this torch is built without CUDA)")
        else:
            sees = f"{count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        raise ConfigError(f'[model] device = "{setting}", but torch sees {sees}; set '
                          f'device = "auto" (CUDA when there is one, else the CPU) or "cpu"')
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def check_precision(device: torch.device, precision: str) -> None:
    """Log a warning when ``bf16`` is asked of a GPU that emulates bfloat16 (slower, not
    faster, than float32 there)."""
    if precision != "bf16" or device.type != "cuda":
        return
    with torch.cuda.device(device):  # (the configured device, not the current one)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    if not native:
        log.warning('[model] precision = "bf16" on %s, which has no native bfloat16: the '
                    'forward pass is emulated (set precision = "fp32")',
                    torch.cuda.get_device_name(device))


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward pass's precision: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu``: for the log."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def about(device: torch.device, precision: str, text: dict[str, Any] | None) -> dict[str, Any]:
    """``status``'s ``model``: where the model runs, in what precision, and over which text
    model (``text``: its identity, :func:`p2pfed.model.agreement.text_identity`; None: the
    node holds no text adapter)."""
    return {"device": describe(device), "precision": precision,
            "text_model": None if text is None else text["summary"],
            "text_digest": None if text is None else text["digest"]}
