"""Provenance mass vectors: credit, the mix against hand-computed values and against the matrix
recursion A(t) = W(t)(A(t-1) + D(t)), flags, the wire form and what a peer may not send."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gossip.errors import MalformedMessageError
from p2pfed.lineage import Lineage, tag
from p2pfed.provenance import APPROX, PARTIAL, Provenance, shares_by_peer

A, B, C, D = (tag(p) for p in ("peer-a", "peer-b", "peer-c", "peer-d"))


def _prov(entries: dict[bytes, float], flags: int = 0) -> Provenance:
    prov = Provenance.empty(flags)
    for t, m in entries.items():
        prov = prov.credit(t, m)
    return prov


def _as_dict(prov: Provenance) -> dict[bytes, float]:
    return {t: float(m) for t, m in zip(prov.tags, prov.mass, strict=True)}


def test_credit_adds_to_an_entry_and_creates_a_missing_one() -> None:
    empty = Provenance.empty()
    assert len(empty.tags) == 0 and empty.total() == 0.0 and empty.flags == 0
    one = empty.credit(B, 2.0)
    assert _as_dict(one) == {B: 2.0} and _as_dict(empty) == {}  # (immutable)
    two = one.credit(A, 1.0).credit(B, 0.5)
    assert _as_dict(two) == {A: 1.0, B: 2.5}
    assert list(two.tags) == sorted([A, B]) and two.tags == Lineage.from_tags([A, B])
    assert _as_dict(two.credit(C, 0.0)) == {A: 1.0, B: 2.5, C: 0.0}
    assert not two.mass.flags.writeable
    with pytest.raises(ValueError):
        two.mass[0] = 9.0


@pytest.mark.parametrize("mass", [-1.0, -1e-300, math.nan, math.inf, -math.inf])
def test_credit_refuses_negative_and_non_finite_mass(mass: float) -> None:
    with pytest.raises(ValueError):
        Provenance.empty().credit(A, mass)


def test_credit_refuses_a_tag_that_is_not_eight_bytes() -> None:
    with pytest.raises(ValueError):
        Provenance.empty().credit(b"short", 1.0)


def test_mix_matches_hand_computed_values_over_overlapping_tags() -> None:
    own = _prov({A: 1.0, B: 2.0})
    left = _prov({B: 4.0, C: 8.0})
    right = _prov({A: 2.0, C: 4.0, D: 16.0})
    mixed = Provenance.mix(0.5, own, [(0.25, left), (0.25, right)])
    # A: .5·1 + .25·2 = 1; B: .5·2 + .25·4 = 2; C: .25·8 + .25·4 = 3; D: .25·16 = 4
    assert _as_dict(mixed) == {A: 1.0, B: 2.0, C: 3.0, D: 4.0}
    assert mixed.total() == 10.0 and mixed.flags == 0


def test_mix_is_bit_identical_when_repeated_and_sums_in_the_given_order() -> None:
    own = _prov({A: 0.1, B: 0.7})
    left = _prov({A: 0.3, C: 1.1})
    right = _prov({A: 0.9, B: 0.2, C: 1e-9})
    w0, w1, w2 = 0.3, 0.3, 0.4
    first = Provenance.mix(w0, own, [(w1, left), (w2, right)])
    again = Provenance.mix(w0, own, [(w1, left), (w2, right)])
    assert first == again and first.mass.tobytes() == again.mass.tobytes()
    # own first, then the terms as given, each added as w·mass (Python floats are IEEE doubles)
    expected = {A: (w0 * 0.1 + w1 * 0.3) + w2 * 0.9, B: w0 * 0.7 + w2 * 0.2,
                C: w1 * 1.1 + w2 * 1e-9}
    assert _as_dict(first) == expected  # (exact equality: the order is fixed)


def test_flags_pass_only_through_inputs_with_weight_and_approx_sets_approx() -> None:
    clean, partial = _prov({A: 1.0}), _prov({B: 1.0}, PARTIAL)
    approx = _prov({C: 1.0}, APPROX)
    assert Provenance.mix(1.0, clean, [(0.0, partial), (0.0, approx)]).flags == 0
    assert Provenance.mix(0.5, clean, [(0.5, partial), (0.0, approx)]).flags == PARTIAL
    assert Provenance.mix(0.0, partial, [(1.0, clean)]).flags == 0
    assert Provenance.mix(0.5, partial, [(0.5, approx)]).flags == PARTIAL | APPROX
    assert Provenance.mix(1.0, clean, [], approx=True).flags == APPROX
    assert Provenance.mix(1.0, partial, [], approx=True).flags == PARTIAL | APPROX
    # an input of weight 0 brings neither mass nor tags
    assert list(Provenance.mix(1.0, clean, [(0.0, partial)]).tags) == [A]
    # flags are sticky through credit
    assert partial.credit(A, 1.0).flags == PARTIAL


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf])
def test_mix_refuses_negative_and_non_finite_weights(weight: float) -> None:
    with pytest.raises(ValueError):
        Provenance.mix(1.0, _prov({A: 1.0}), [(weight, _prov({B: 1.0}))])


def test_encode_decode_round_trip_aligned_to_a_bigger_lineage() -> None:
    prov = _prov({A: 1.5, C: 0.25, D: 0.0}, PARTIAL)
    lineage = Lineage.from_tags([A, B, C, D])
    blob = prov.encode(lineage)
    assert len(blob) == 8 * len(lineage)
    expected = [{A: 1.5, C: 0.25}.get(t, 0.0) for t in lineage]
    assert np.frombuffer(blob, dtype="<f8").tolist() == expected
    back = Provenance.decode(lineage, blob, PARTIAL)
    assert _as_dict(back) == {A: 1.5, C: 0.25}  # (zero entries dropped)
    assert back == prov.drop([D]) and back.flags == PARTIAL
    assert Provenance.decode(lineage, Provenance.empty().encode(lineage), 0) \
        == Provenance.empty()


def test_encode_refuses_a_member_with_mass_outside_the_lineage() -> None:
    prov = _prov({A: 1.0, B: 2.0})
    with pytest.raises(ValueError):
        prov.encode(Lineage.from_tags([A, C]))
    # an entry without mass may be left out
    assert _prov({A: 1.0, B: 0.0}).encode(Lineage.from_tags([A])) \
        == np.array([1.0], dtype="<f8").tobytes()


def _blob(*values: float) -> bytes:
    return np.array(values, dtype="<f8").tobytes()


@pytest.mark.parametrize(("blob", "flags"), [
    (_blob(1.0, 2.0), 0),                     # too short
    (_blob(1.0, 2.0, 3.0, 4.0), 0),           # too long
    (_blob(1.0, math.nan, 0.0), 0),
    (_blob(1.0, -1.0, 0.0), 0),
    (_blob(math.inf, 1.0, 0.0), 0),
    (_blob(1.0, 1.0, 0.0), 4),
    (_blob(1.0, 1.0, 0.0), -1),
    (_blob(1.0, 1.0, 0.0), 1.0),
    (_blob(1.0, 1.0, 0.0), True),
    (_blob(1.0, 1.0, 0.0), "1"),
    (bytearray(_blob(1.0, 1.0, 0.0)), 0),
    ([1.0, 1.0, 0.0], 0),
    (None, 0),
])
def test_decode_refuses_what_a_peer_may_not_send(blob: object, flags: object) -> None:
    lineage = Lineage.from_tags([A, B, C])
    with pytest.raises(MalformedMessageError):
        Provenance.decode(lineage, blob, flags)


def test_shares_sum_to_one_and_are_empty_without_mass() -> None:
    prov = _prov({A: 0.1, B: 0.2, C: 0.3, D: 1e-7})
    shares = prov.shares()
    assert set(shares) == {A, B, C, D} and abs(math.fsum(shares.values()) - 1.0) <= 1e-12
    assert shares[C] == pytest.approx(0.3 / (0.6 + 1e-7))
    assert Provenance.empty().shares() == {} and _prov({A: 0.0}).shares() == {}
    by_peer = shares_by_peer(prov, ["peer-a", "peer-b", "peer-d", "stranger"])
    assert by_peer["peer-a"] == shares[A] and by_peer[f"unknown:{C.hex()}"] == shares[C]
    assert len(by_peer) == 4


def test_drop_removes_entries_without_renormalising() -> None:
    prov = _prov({A: 1.0, B: 2.0, C: 3.0}, APPROX)
    dropped = prov.drop([B, D])
    assert _as_dict(dropped) == {A: 1.0, C: 3.0} and dropped.flags == APPROX
    assert prov.drop([]) == prov and _as_dict(prov.drop([A, B, C])) == {}


def test_equality_compares_tags_masses_and_flags() -> None:
    prov = _prov({A: 1.0})
    assert prov == _prov({A: 1.0}) and hash(prov) == hash(_prov({A: 1.0}))
    assert prov != _prov({A: 1.0}, PARTIAL) and prov != _prov({A: 2.0})
    assert prov != _prov({B: 1.0}) and prov != "Provenance"
    assert "1 members" in repr(prov)


_N_MAX, _ROUNDS_MAX = 5, 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, _N_MAX), st.integers(1, _ROUNDS_MAX), st.data())
def test_mixing_vectors_equals_the_matrix_recursion(n: int, rounds: int,
                                                    data: st.DataObject) -> None:
    """Node i is member i: train credits m_i(t), then every node mixes with row i of W(t);
    a row drawn all zero is a node that did not mix (identity row)."""
    raw = data.draw(arrays(np.float64, (rounds, n, n), elements=st.floats(0.0, 1.0)))
    masses = data.draw(arrays(np.float64, (rounds, n), elements=st.floats(0.0, 10.0)))
    members = [tag(f"node-{i}") for i in range(n)]
    provs = [Provenance.empty() for _ in range(n)]
    matrix = np.zeros((n, n))
    for t in range(rounds):
        weights = raw[t].copy()
        for i in range(n):
            total = weights[i].sum()
            weights[i] = np.eye(n)[i] if total == 0.0 else weights[i] / total
        trained = [p.credit(members[i], float(masses[t, i])) for i, p in enumerate(provs)]
        provs = [Provenance.mix(float(weights[i, i]), trained[i],
                                [(float(weights[i, j]), trained[j]) for j in range(n) if j != i])
                 for i in range(n)]
        matrix = weights @ (matrix + np.diag(masses[t]))
    order = np.argsort(np.frombuffer(b"".join(members), dtype=">u8"))
    lineage = Lineage.from_tags(members)
    for i, prov in enumerate(provs):
        got = np.frombuffer(prov.encode(lineage), dtype="<f8")
        np.testing.assert_allclose(got, matrix[i][order], rtol=0, atol=1e-12)
