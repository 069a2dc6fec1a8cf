"""Flat component buffers: canonical layouts, untrusted layout records, zero-copy binding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gossip.catalog import ComponentKind, ComponentSpec
from gossip.errors import ConfigError, LocalError, MalformedMessageError
from p2pfed.components import ComponentRegistry, FlatComponent, FlatLayout, ParamSlot

SPEC = ComponentSpec("head.topic", ComponentKind.HEAD, task="topic")


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_layout_is_canonical_and_packed_by_name() -> None:
    a = FlatLayout.from_shapes({"weight": (3, 4), "bias": (3,)})
    b = FlatLayout.from_shapes({"bias": [3], "weight": torch.Size([3, 4])})
    assert a == b
    assert a.slots == (
        ParamSlot("bias", (3,), 0, 3),
        ParamSlot("weight", (3, 4), 3, 12),
    )
    assert a.numel == 15
    assert a.nbytes == 60
    assert a != FlatLayout.from_shapes({"weight": (3, 4), "bias": (3,)}, torch.float64)
    assert a != FlatLayout.from_shapes({"weight": (4, 3), "bias": (3,)})


def test_layout_record_round_trip() -> None:
    layout = FlatLayout.from_shapes({"w": (2, 3), "b": (3,), "s": ()}, torch.bfloat16)
    record = layout.to_record()
    assert record == ["bfloat16", 10, [["b", [3]], ["s", []], ["w", [2, 3]]]]
    assert FlatLayout.from_record(record) == layout


def test_layout_rejects_local_misuse() -> None:
    with pytest.raises(ConfigError):
        FlatLayout.from_shapes({"w": (2, -1)})
    with pytest.raises(ConfigError):
        FlatLayout.from_shapes({"w": (2,)}, torch.int64)
    with pytest.raises(ConfigError):
        FlatLayout((ParamSlot("w", (2,), 1, 2),), torch.float32, 3)


@pytest.mark.parametrize(
    "record",
    [
        None,
        "float32",
        ["float32", 3],
        ["int8", 3, [["w", [3]]]],
        ["float32", True, [["w", [1]]]],
        ["float32", 3, [["w", [3]], ["w", [0]]]],  # duplicate name
        ["float32", 5, [["w", [3]], ["b", [2]]]],  # unsorted
        ["float32", 4, [["w", [3]]]],  # numel mismatch
        ["float32", -3, [["w", [-3]]]],  # negative
        ["float32", 2**64, [["w", [2**64]]]],  # overflow
        ["float32", 2**62, [["w", [2**31, 2**31]]]],  # product too large
        ["float32", 1, [["w", [True]]]],
        ["float32", 1, [["w", [1.0]]]],
        ["float32", 1, [["", [1]]]],
        ["float32", 1, [[7, [1]]]],
        ["float32", 1, [["w", [1] * 17]]],
        ["float32", 1, [["w", 1]]],
        ["float32", 1, [["w"]]],
        ["float32", 1, "w"],
    ],
)
def test_layout_from_record_rejects_odd_records(record: Any) -> None:
    with pytest.raises(MalformedMessageError):
        FlatLayout.from_record(record)


def test_from_params_copies_and_views_are_zero_copy() -> None:
    params = {"weight": torch.ones(3, 4), "bias": torch.arange(3.0)}
    comp = FlatComponent.from_params(SPEC, params)
    assert comp.flat.shape == (15,)
    assert comp.flat[:3].tolist() == [0.0, 1.0, 2.0]
    params["bias"].fill_(9.0)
    assert comp.flat[:3].tolist() == [0.0, 1.0, 2.0]
    views = comp.views()
    assert views["weight"].shape == (3, 4)
    views["weight"][1, 2] = 5.0
    assert comp.flat[3 + 1 * 4 + 2].item() == 5.0
    assert views["bias"].data_ptr() == comp.flat.data_ptr()


def test_from_params_rejects_mixed_dtypes_and_empty() -> None:
    with pytest.raises(ConfigError):
        FlatComponent.from_params(SPEC, {"a": torch.ones(2), "b": torch.ones(2).double()})
    with pytest.raises(ConfigError):
        FlatComponent.from_params(SPEC, {})
    comp = FlatComponent.from_params(
        SPEC, {"a": torch.ones(2), "b": torch.ones(2).double()}, dtype=torch.float64
    )
    assert comp.flat.dtype == torch.float64


def test_bind_makes_training_write_into_the_buffer() -> None:
    model = _linear()
    named = dict(model.named_parameters())
    comp = FlatComponent.from_params(SPEC, named)
    comp.bind(named)
    assert comp.is_bound(named)
    before = comp.flat.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(8, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    assert not torch.equal(before, comp.flat)
    # the buffer is exactly the parameters, element by element
    assert torch.equal(comp.flat[:3], model.bias.detach())
    assert torch.equal(comp.flat[3:].view(3, 4), model.weight.detach())


def test_bind_keeps_buffer_values_unless_asked() -> None:
    model = _linear()
    named = dict(model.named_parameters())
    comp = FlatComponent(SPEC, FlatLayout.from_shapes({n: p.shape for n, p in named.items()}))
    weight = model.weight.detach().clone()
    comp.bind(named)
    assert torch.count_nonzero(model.weight) == 0
    comp.flat.fill_(2.0)
    assert torch.all(model.weight == 2.0)

    other = _linear()
    named2 = dict(other.named_parameters())
    comp2 = FlatComponent(SPEC, comp.layout)
    comp2.bind(named2, take_values=True)
    assert torch.equal(comp2.views()["weight"], weight)


def test_bind_rejects_mismatches() -> None:
    model = _linear()
    named = dict(model.named_parameters())
    comp = FlatComponent.from_params(SPEC, named)
    with pytest.raises(ConfigError):
        comp.bind({"weight": named["weight"]})
    other = torch.nn.Linear(3, 4)
    with pytest.raises(ConfigError):
        comp.bind(dict(other.named_parameters()))


def test_load_keeps_binding_clone_is_independent_and_fingerprint() -> None:
    model = _linear()
    named = dict(model.named_parameters())
    comp = FlatComponent.from_params(SPEC, named)
    comp.bind(named)
    fp = comp.fingerprint()
    assert len(fp) == 64
    int(fp, 16)
    copy = comp.clone()
    assert copy.fingerprint() == fp
    assert copy.flat.data_ptr() != comp.flat.data_ptr()

    comp.load_(torch.full((15,), 3.0))
    assert comp.is_bound(named)
    assert torch.all(model.bias == 3.0)
    assert comp.fingerprint() != fp
    assert copy.fingerprint() == fp
    with pytest.raises(LocalError):
        comp.load_(torch.zeros(14))

    double = FlatComponent(SPEC, FlatLayout.from_shapes(comp.layout.shapes(), torch.float64))
    assert double.fingerprint() != FlatComponent(SPEC, comp.layout).fingerprint()


def test_buffer_must_match_layout() -> None:
    layout = FlatLayout.from_shapes({"w": (4,)})
    with pytest.raises(LocalError):
        FlatComponent(SPEC, layout, torch.zeros(5))
    with pytest.raises(LocalError):
        FlatComponent(SPEC, layout, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(LocalError):
        FlatComponent(SPEC, layout, torch.zeros(2, 2))


def test_registry() -> None:
    text = ComponentSpec.from_name("encoder.text.lora")
    head = ComponentSpec.from_name("head.topic")
    registry = ComponentRegistry([head, text])
    registry.register(text)  # same spec again: fine
    assert len(registry) == 2
    assert registry.names() == ("encoder.text.lora", "head.topic")
    assert [s.name for s in registry] == ["encoder.text.lora", "head.topic"]
    assert "head.topic" in registry
    assert "backbone" not in registry
    assert registry.get("head.topic") is head
    with pytest.raises(ConfigError, match=r"unknown component 'backbone'.*head\.topic"):
        registry.get("backbone")
    with pytest.raises(ConfigError, match="different spec"):
        registry.register(ComponentSpec.from_name("head.topic", base_fingerprint="ab"))
    subset = registry.holding(["head.topic"])
    assert subset.names() == ("head.topic",)
    with pytest.raises(ConfigError):
        registry.holding(["prompt.essay"])
