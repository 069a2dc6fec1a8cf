"""Provenance: how much of each member's training a component's state holds.

A state is a linear mix of members' updates: training adds Δ_i to node i's own state, then
the node mixes ``x_i ← w_self·x_i + Σ_j w_j·x_j``.  A *mass vector* follows the same recursion
with the very same weights — training credits ``m_i = ‖Δ_i‖₂`` to the node's own member, the
mix combines the vectors — so ``A(t) = W(t)(A(t-1) + D(t))`` holds exactly, and a member's
*share* of a state is its mass over the total.  Normalised shares cannot be mixed (totals
differ between nodes), which is why the unnormalised mass is what travels and is stored.

Members are keyed by lineage tags (:mod:`p2pfed.lineage`); on the wire the masses are aligned
to the announcement's own lineage, so no tag is written twice.  Flags say when shares are not
exact: :data:`PARTIAL` (some mass is not attributed) and :data:`APPROX` (the weights were not
the exact linear ones).  Both are sticky through every mix that gives an input weight.

Numpy only: the CLI reads provenance without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gossip.errors import MalformedMessageError
from p2pfed.lineage import MAX_MEMBERS, TAG_BYTES, Lineage, tag

#: some mass is not attributed (an old checkpoint, a neighbour that sent no vector)
PARTIAL = 1
#: the weights used for the vector were not the exact linear ones (trimmed mean, fast unlearning)
APPROX = 2
_ALL_FLAGS = PARTIAL | APPROX
#: the largest mass a peer may announce for a member: mixes are convex, so no sum of at most
#: MAX_MEMBERS such masses (plus finite credits) can overflow a float64
MAX_MASS = 1e200
_WORD = np.dtype(">u8")  # (a tag as an integer in lineage order, as lineage.py sorts them)
_WIRE = np.dtype("<f8")

Mass = npt.NDArray[np.float64]


def _words(lineage: Lineage) -> npt.NDArray[np.uint64]:
    return np.frombuffer(lineage.packed, dtype=_WORD)


def _at(within: Lineage, part: Lineage) -> npt.NDArray[np.intp]:
    """Where each tag of ``part`` sits in ``within`` (every tag of ``part`` must be there)."""
    return np.searchsorted(_words(within), _words(part))


@dataclass(frozen=True, eq=False)
class Provenance:
    """Mass per member for one state: ``tags`` and ``mass`` aligned, ``mass`` read-only."""

    tags: Lineage
    mass: Mass
    flags: int = 0

    def __post_init__(self) -> None:
        mass = np.array(self.mass, dtype=np.float64)  # (a copy: the caller keeps theirs)
        if mass.ndim != 1 or mass.size != len(self.tags):
            raise ValueError(f"{mass.size} masses for {len(self.tags)} tags")
        if mass.size > MAX_MEMBERS:
            raise ValueError(f"provenance of {mass.size} members (at most {MAX_MEMBERS})")
        if not bool(np.all(np.isfinite(mass) & (mass >= 0.0))):
            raise ValueError("every mass must be finite and >= 0")
        if isinstance(self.flags, bool) or not isinstance(self.flags, int) \
                or not 0 <= self.flags <= _ALL_FLAGS:
            raise ValueError(f"flags {self.flags!r} not in 0..{_ALL_FLAGS}")
        mass.flags.writeable = False
        object.__setattr__(self, "mass", mass)

    @classmethod
    def empty(cls, flags: int = 0) -> Provenance:
        return cls(Lineage(), np.zeros(0), flags)

    def credit(self, member_tag: bytes, mass: float) -> Provenance:
        """This vector with ``mass`` added to ``member_tag``'s entry (created if absent)."""
        if not isinstance(member_tag, bytes) or len(member_tag) != TAG_BYTES:
            raise ValueError(f"a member tag is {TAG_BYTES} bytes")
        if not math.isfinite(mass) or mass < 0.0:
            raise ValueError(f"credit {mass!r} must be finite and >= 0")
        tags = self.tags | Lineage(member_tag)
        out = np.zeros(len(tags))
        out[_at(tags, self.tags)] = self.mass
        out[_at(tags, Lineage(member_tag))] += mass
        return Provenance(tags, out, self.flags)

    @staticmethod
    def mix(self_weight: float, own: Provenance,
            terms: Sequence[tuple[float, Provenance]], *, approx: bool = False) -> Provenance:
        """``self_weight·own + Σ w·p``, with the weights the parameters were mixed with.

        Sums run in a fixed order (``own``, then ``terms`` as given), so the same inputs give
        the same bits on every node and on a re-run.  An input of weight 0 adds nothing, not
        even its tags or flags.  Weights must be finite and >= 0 (:class:`ValueError`):
        a negative one would give negative mass, which peers refuse."""
        inputs = [(self_weight, own), *terms]
        for w, _ in inputs:
            if not math.isfinite(w) or w < 0.0:
                raise ValueError(f"mixing weight {w!r} must be finite and >= 0")
        used = [(w, p) for w, p in inputs if w > 0.0]
        tags = Lineage().union(*(p.tags for _, p in used))
        if len(tags) > MAX_MEMBERS:
            raise ValueError(f"provenance of {len(tags)} members (at most {MAX_MEMBERS})")
        out = np.zeros(len(tags))
        flags = APPROX if approx else 0
        for w, p in used:
            out[_at(tags, p.tags)] += w * p.mass  # (positions are distinct: one add each)
            flags |= p.flags
        return Provenance(tags, out, flags)

    def encode(self, lineage: Lineage) -> bytes:
        """The masses as ``<f8``, one per tag of ``lineage`` in its order (0.0 where none);
        :class:`ValueError` if a member with mass > 0 is not in ``lineage``."""
        words = _words(lineage)
        at = np.searchsorted(words, _words(self.tags))
        found = at < words.size
        found[found] = words[at[found]] == _words(self.tags)[found]
        if bool(np.any(self.mass[~found] > 0.0)):
            raise ValueError(f"{int(np.count_nonzero(self.mass[~found]))} members with mass "
                             "are not in the lineage")
        out = np.zeros(words.size, dtype=_WIRE)
        out[at[found]] = self.mass[found]
        return out.tobytes()

    @classmethod
    def decode(cls, lineage: Lineage, blob: object, flags: object) -> Provenance:
        """:meth:`encode`'s bytes from a peer (:class:`MalformedMessageError`); zero entries
        are dropped, so ``tags`` names the members with mass."""
        if not isinstance(blob, bytes):
            raise MalformedMessageError(f"provenance mass is {type(blob).__name__}, not bytes")
        if len(blob) != _WIRE.itemsize * len(lineage):
            raise MalformedMessageError(f"provenance mass of {len(blob)} bytes for a lineage "
                                        f"of {len(lineage)} members")
        if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= _ALL_FLAGS:
            raise MalformedMessageError(f"provenance flags {flags!r} not in 0..{_ALL_FLAGS}")
        mass = np.frombuffer(blob, dtype=_WIRE).astype(np.float64)
        if not bool(np.all(np.isfinite(mass) & (mass >= 0.0) & (mass <= MAX_MASS))):
            raise MalformedMessageError(f"provenance mass is not in 0..{MAX_MASS:g}")
        keep = mass > 0.0
        tags = Lineage(_words(lineage)[keep].tobytes())  # (a subset stays sorted)
        return cls(tags, mass[keep], flags)

    def total(self) -> float:
        """The sum of the masses (scaled by the largest first: no overflow on any vector)."""
        top = float(self.mass.max()) if self.mass.size else 0.0
        if top == 0.0:
            return 0.0
        return math.fsum((self.mass / top).tolist()) * top

    def shares(self) -> dict[bytes, float]:
        """Member tag → mass / total; empty when there is no mass."""
        top = float(self.mass.max()) if self.mass.size else 0.0
        if top == 0.0:
            return {}
        scaled = self.mass / top  # (a vector summing past the float64 range still has shares)
        total = math.fsum(scaled.tolist())
        return {t: float(m) / total for t, m in zip(self.tags, scaled, strict=True)}

    def drop(self, member_tags: Iterable[bytes]) -> Provenance:
        """Without those members' entries (the rest is not renormalised)."""
        gone = set(member_tags)
        keep = np.array([t not in gone for t in self.tags], dtype=bool)
        if bool(keep.all()):
            return self
        return Provenance(Lineage(_words(self.tags)[keep].tobytes()), self.mass[keep],
                          self.flags)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Provenance) and other.tags == self.tags
                and other.mass.tobytes() == self.mass.tobytes() and other.flags == self.flags)

    def __hash__(self) -> int:
        return hash((self.tags.packed, self.mass.tobytes(), self.flags))

    def __repr__(self) -> str:
        return (f"Provenance({len(self.tags)} members, total={self.total():.6g}, "
                f"flags={self.flags})")


def shares_by_peer(prov: Provenance, peers: Iterable[str]) -> dict[str, float]:
    """:meth:`Provenance.shares` keyed by peer id; a tag none of ``peers`` has is reported as
    ``"unknown:<hex>"`` (a member that left, or one this node never knew)."""
    names = {tag(p): p for p in peers}
    return {names.get(t, f"unknown:{t.hex()}"): s for t, s in prov.shares().items()}
