"""Flat contiguous buffers for model components.

Every component (``encoder.text.lora``, ``head.topic``, ...) lives in one contiguous 1-D tensor.
A :class:`FlatLayout` says where each named parameter sits in that buffer; it is canonical
(slots sorted by name, packed without gaps), so two nodes that hold the same parameters compute
the same layout and can mix their buffers element by element.

:class:`FlatComponent` owns the buffer.  :meth:`FlatComponent.bind` points the ``.data`` of a
module's parameters into the buffer, so local training writes straight into it and mixing,
encoding and hashing never gather parameters again (zero copy).

Wire form of a layout (:meth:`FlatLayout.to_record`): ``[dtype_name, numel, [[name, [dims...]],
...]]``; offsets are implied by the order.  :meth:`FlatLayout.from_record` treats its input as
untrusted peer data and raises :class:`~gossip.errors.MalformedMessageError` on anything odd.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gossip.catalog import ComponentSpec
from gossip.envelope import digest, packb
from gossip.errors import ConfigError, LocalError, MalformedMessageError

logger = logging.getLogger(__name__)

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dt for dt, name in DTYPE_NAMES.items()}

MAX_SLOTS = 1 << 16
MAX_NDIM = 16
MAX_PARAM_NAME_CHARS = 512
MAX_NUMEL = 1 << 40


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a supported floating dtype (``"float32"``...)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(
            f"unsupported dtype {dtype}; use one of {', '.join(DTYPE_NAMES.values())}"
        ) from None


def _shape_numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class ParamSlot:
    """Where one named parameter sits in a flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatLayout:
    """The canonical packing of named parameters into one 1-D buffer.

    Equality is structural (slots, dtype and total size), so a layout decoded from a peer compares
    equal to the local one exactly when the buffers are interchangeable.
    """

    slots: tuple[ParamSlot, ...]
    dtype: torch.dtype = torch.float32
    numel: int = 0

    def __post_init__(self) -> None:
        dtype_name(self.dtype)
        offset = 0
        previous: str | None = None
        for slot in self.slots:
            if previous is not None and slot.name <= previous:
                raise ConfigError("layout slots must have unique names in sorted order")
            if slot.offset != offset or slot.numel != _shape_numel(slot.shape):
                raise ConfigError(f"layout slot {slot.name!r} is not packed canonically")
            offset += slot.numel
            previous = slot.name
        if offset != self.numel:
            raise ConfigError(f"layout numel {self.numel} != sum of slots {offset}")

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype = torch.float32
    ) -> FlatLayout:
        """Pack ``shapes`` in name order (the canonical layout)."""
        slots: list[ParamSlot] = []
        offset = 0
        for name in sorted(shapes):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"parameter name must be a non-empty string, got {name!r}")
            shape = tuple(int(d) for d in shapes[name])
            if any(d < 0 for d in shape):
                raise ConfigError(f"parameter {name!r} has a negative dimension: {shape}")
            numel = _shape_numel(shape)
            slots.append(ParamSlot(name, shape, offset, numel))
            offset += numel
        return cls(tuple(slots), dtype, offset)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def names(self) -> tuple[str, ...]:
        return tuple(slot.name for slot in self.slots)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {slot.name: slot.shape for slot in self.slots}

    def to_record(self) -> list[Any]:
        """Msgpack-friendly form: ``[dtype_name, numel, [[name, [dims...]], ...]]``."""
        return [
            dtype_name(self.dtype),
            self.numel,
            [[slot.name, list(slot.shape)] for slot in self.slots],
        ]

    @classmethod
    def from_record(cls, obj: Any) -> FlatLayout:
        """Parse an untrusted record; anything odd raises :class:`MalformedMessageError`."""
        if not isinstance(obj, list) or len(obj) != 3:
            raise MalformedMessageError("layout must be a 3-element array")
        name, numel, entries = obj
        if not isinstance(name, str) or name not in DTYPES_BY_NAME:
            raise MalformedMessageError(f"unsupported layout dtype {name!r}")
        if not _is_int(numel) or not 0 <= numel <= MAX_NUMEL:
            raise MalformedMessageError(f"layout numel {numel!r} out of range")
        if not isinstance(entries, list) or len(entries) > MAX_SLOTS:
            raise MalformedMessageError(f"layout slots must be an array of at most {MAX_SLOTS}")
        slots: list[ParamSlot] = []
        offset = 0
        previous: str | None = None
        for entry in entries:
            slot_name, shape = _parse_slot(entry)
            if previous is not None and slot_name <= previous:
                raise MalformedMessageError("layout slot names must be unique and sorted")
            size = _shape_numel(shape)
            if offset + size > MAX_NUMEL:
                raise MalformedMessageError("layout exceeds the maximum number of elements")
            slots.append(ParamSlot(slot_name, shape, offset, size))
            offset += size
            previous = slot_name
        if offset != numel:
            raise MalformedMessageError(f"layout numel {numel} != sum of slot sizes {offset}")
        return cls(tuple(slots), DTYPES_BY_NAME[name], offset)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_slot(entry: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, list) or len(entry) != 2:
        raise MalformedMessageError("layout slot must be a [name, shape] pair")
    name, shape = entry
    if not isinstance(name, str) or not 0 < len(name) <= MAX_PARAM_NAME_CHARS:
        raise MalformedMessageError("layout slot name must be a short non-empty string")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise MalformedMessageError(f"layout slot {name!r}: shape must have <= {MAX_NDIM} dims")
    for dim in shape:
        if not _is_int(dim) or not 0 <= dim <= MAX_NUMEL:
            raise MalformedMessageError(f"layout slot {name!r}: bad dimension {dim!r}")
    dims = tuple(shape)
    if _shape_numel(dims) > MAX_NUMEL:
        raise MalformedMessageError(f"layout slot {name!r} is too large")
    return name, dims


def tensor_bytes(flat: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor (native, i.e. little-endian, order)."""
    if flat.device.type != "cpu" or not flat.is_contiguous():
        raise LocalError("expected a contiguous CPU tensor")
    raw = flat.detach().reshape(-1).view(torch.uint8)
    return raw.numpy().data.cast("B")


class FlatComponent:
    """One component's parameters in a single contiguous 1-D buffer ``flat``."""

    __slots__ = ("flat", "layout", "spec")

    def __init__(
        self, spec: ComponentSpec, layout: FlatLayout, flat: torch.Tensor | None = None
    ) -> None:
        if flat is None:
            flat = torch.zeros(layout.numel, dtype=layout.dtype)
        _check_flat(flat, layout)
        self.spec = spec
        self.layout = layout
        self.flat = flat

    @classmethod
    def from_params(
        cls,
        spec: ComponentSpec,
        params: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
    ) -> FlatComponent:
        """Copy ``params`` into a new flat buffer (dtype: ``dtype`` or the parameters' own)."""
        if not params:
            raise ConfigError(f"component {spec.name!r} has no parameters")
        if dtype is None:
            dtypes = {p.dtype for p in params.values()}
            if len(dtypes) != 1:
                kinds = sorted(map(str, dtypes))
                raise ConfigError(f"component {spec.name!r} mixes dtypes {kinds}")
            dtype = dtypes.pop()
        layout = FlatLayout.from_shapes({n: tuple(p.shape) for n, p in params.items()}, dtype)
        component = cls(spec, layout, torch.empty(layout.numel, dtype=dtype))
        with torch.no_grad():
            for name, view in component.views().items():
                view.copy_(params[name].detach())
        return component

    def views(self) -> dict[str, torch.Tensor]:
        """Each parameter as a view into ``flat`` (writes go to the buffer)."""
        return {
            slot.name: self.flat[slot.offset : slot.end].view(slot.shape)
            for slot in self.layout.slots
        }

    def bind(
        self, module_params: Mapping[str, torch.nn.Parameter], *, take_values: bool = False
    ) -> None:
        """Make each parameter's ``.data`` a view into ``flat`` (the buffer's values win).

        With ``take_values=True`` the parameters' current values are copied into the buffer
        first.  The parameter objects stay the same, so optimizers built on them keep working
        and every optimizer step writes straight into ``flat``.
        """
        names = set(module_params)
        expected = set(self.layout.names())
        if names != expected:
            missing = sorted(expected - names)
            extra = sorted(names - expected)
            raise ConfigError(
                f"cannot bind {self.spec.name!r}: missing {missing}, unexpected {extra}"
            )
        views = self.views()
        for name, param in module_params.items():
            view = views[name]
            if tuple(param.shape) != tuple(view.shape) or param.dtype != view.dtype:
                raise ConfigError(
                    f"cannot bind {self.spec.name!r}.{name}: parameter is "
                    f"{tuple(param.shape)} {param.dtype}, slot is {tuple(view.shape)} {view.dtype}"
                )
            if param.device != view.device:
                raise ConfigError(f"cannot bind {name!r}: parameter on {param.device}")
        with torch.no_grad():
            for name, param in module_params.items():
                if take_values:
                    views[name].copy_(param.detach())
                param.data = views[name]
        logger.debug("bound %d parameters of %s", len(views), self.spec.name)

    def is_bound(self, module_params: Mapping[str, torch.nn.Parameter]) -> bool:
        """True when every parameter's storage is its slot in ``flat`` (the binding held)."""
        views = self.views()
        if set(module_params) != set(views):
            return False
        return all(
            p.data_ptr() == views[n].data_ptr() and p.shape == views[n].shape
            for n, p in module_params.items()
        )

    def load_(self, flat_tensor: torch.Tensor) -> FlatComponent:
        """Copy ``flat_tensor`` into the buffer in place (bindings stay valid)."""
        if flat_tensor.numel() != self.layout.numel:
            raise LocalError(
                f"cannot load {flat_tensor.numel()} elements into {self.spec.name!r} "
                f"({self.layout.numel} elements)"
            )
        with torch.no_grad():
            self.flat.copy_(flat_tensor.reshape(-1))
        return self

    def clone(self) -> FlatComponent:
        """An independent copy (not bound to any module)."""
        return FlatComponent(self.spec, self.layout, self.flat.detach().clone())

    def fingerprint(self) -> str:
        """SHA-256 hex over the layout record and the raw buffer bytes.

        Computed as ``digest(packb([layout_record, digest(buffer)]))`` so the buffer is hashed
        in place, without concatenating it with anything.
        """
        inner = digest(tensor_bytes(self.flat))
        return digest(packb([self.layout.to_record(), inner])).hex()

    def __repr__(self) -> str:
        return (
            f"FlatComponent({self.spec.name!r}, {len(self.layout.slots)} params, "
            f"{self.layout.numel} x {dtype_name(self.layout.dtype)})"
        )


def _check_flat(flat: torch.Tensor, layout: FlatLayout) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise LocalError("a component buffer must be a contiguous 1-D tensor")
    if flat.numel() != layout.numel or flat.dtype != layout.dtype:
        raise LocalError(
            f"buffer of {flat.numel()} x {flat.dtype} does not match the layout "
            f"({layout.numel} x {layout.dtype})"
        )


class ComponentRegistry:
    """The component specs this node knows about, by name."""

    def __init__(self, specs: Iterable[ComponentSpec] = ()) -> None:
        self._specs: dict[str, ComponentSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ComponentSpec) -> ComponentSpec:
        """Add ``spec``; registering the same spec twice is a no-op, a different one an error."""
        known = self._specs.get(spec.name)
        if known is not None and known != spec:
            raise ConfigError(
                f"component {spec.name!r} is already registered with a different spec: "
                f"{known} vs {spec}"
            )
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> ComponentSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"unknown component {name!r} (registered: {known})") from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))

    def holding(self, names: Iterable[str]) -> ComponentRegistry:
        """A registry with only ``names`` (each must be registered)."""
        return ComponentRegistry(self.get(name) for name in names)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ComponentSpec]:
        return iter([self._specs[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"ComponentRegistry({list(self.names())})"
