"""The M3T model: exact adapter aggregation, hard personalisation, training, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gossip.errors import ConfigError
from p2pfed.consensus import mix_into
from p2pfed.model.export import export_component
from p2pfed.model.m3t import AdapterMode, M3TModel, ModelSpec, TaskSpec, load_text_base
from p2pfed.model.train import LocalTrainer, TaskData, TrainRequest

TASKS = (TaskSpec("digits", ("image",), 10, backbone=True), TaskSpec("topic", ("text",), 4),
         TaskSpec("engagement", ("activity", "text"), 3, backbone=True))
SPEC = ModelSpec(TASKS, text_model="tiny")
TEXT = "encoder.text.lora"


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, object]:
    return load_text_base("tiny")


def _fresh_base() -> tuple[torch.nn.Module, object]:
    return load_text_base("tiny")


def _randomise(trainer: LocalTrainer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for flat in trainer.flats.values():
        flat.flat.copy_(torch.randn(flat.flat.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("mode", [AdapterMode.FROZEN_A, AdapterMode.AB])
def test_adapter_aggregation_exactness(mode: AdapterMode) -> None:
    spec = ModelSpec(TASKS, text_model="tiny", adapter_mode=mode)
    trainers = []
    for i in range(3):
        model = M3TModel.build(spec, [TEXT, "head.topic"], text_base=_fresh_base())
        trainer = LocalTrainer(model, {}, node_seed=i)
        _randomise(trainer, i)
        trainers.append(trainer)
    deltas = [t.model.modules[TEXT].delta_weights() for t in trainers]  # type: ignore[operator]
    weights = [0.5, 0.3, 0.2]
    expected = {k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}
    out = torch.empty_like(trainers[0].flats[TEXT].flat)
    mix_into(out, [(w, t.flats[TEXT].flat) for w, t in zip(weights, trainers, strict=True)])
    trainers[0].flats[TEXT].load_(out)
    mixed = trainers[0].model.modules[TEXT].delta_weights()  # type: ignore[operator]
    worst = max(float((mixed[k] - expected[k]).abs().max().detach()) for k in expected)
    if mode is AdapterMode.FROZEN_A:
        assert worst <= 1e-6  # the default mixes ΔW exactly
    else:
        assert worst > 1e-4  # averaging A and B separately does not


def test_a_node_builds_and_trains_only_what_it_holds(base: tuple[torch.nn.Module, object]) -> None:
    held = [TEXT, "head.topic"]
    model = M3TModel.build(SPEC, held, text_base=base)
    assert sorted(model.modules) == held
    assert model.tasks() == ["topic"]
    data = {"topic": TaskData({"text": ["a b", "c d", "e f", "g h"]}, np.array([0, 1, 2, 3]))}
    trainer = LocalTrainer(model, data, node_seed=1, steps=2, batch_size=4)
    assert sorted(trainer.components()) == held
    assert trainer.trained_tasks("head.topic") == ["topic"]
    with pytest.raises(ConfigError, match="needs the rest of its pipeline"):
        M3TModel.build(SPEC, ["head.topic"], text_base=base)
    with pytest.raises(ConfigError, match="needs the rest of its pipeline"):
        M3TModel.build(SPEC, ["head.digits", "encoder.image"])


def test_training_writes_into_the_flat_buffer_and_repeats_exactly() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 8, 8), dtype=np.float32)
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.int64)
    data = {"digits": TaskData({"image": images}, labels)}
    held = ["backbone", "encoder.image", "head.digits"]
    results = []
    for _ in range(2):
        model = M3TModel.build(SPEC, held, init_seed=3)
        trainer = LocalTrainer(model, data, node_seed=7, steps=20, batch_size=16, lr=1e-2)
        before = {k: f.flat.clone() for k, f in trainer.flats.items()}
        first = trainer.train("head.digits", 0)
        trainer.train("encoder.image", 0)
        last = trainer.train("head.digits", 1)
        assert last < first
        assert not torch.equal(before["head.digits"], trainer.flats["head.digits"].flat)
        assert torch.equal(before["backbone"], trainer.flats["backbone"].flat)  # not trained
        results.append({k: f.flat.clone() for k, f in trainer.flats.items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k])


def test_exported_adapter_loads_with_peft_and_gives_the_same_outputs(tmp_path: Path) -> None:
    from peft import PeftModel

    model = M3TModel.build(SPEC, [TEXT, "head.topic"], text_base=_fresh_base())
    trainer = LocalTrainer(model, {}, node_seed=0)
    _randomise(trainer, 5)
    files = export_component(model, TEXT, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "projection.safetensors"} <= {
        f.name for f in files}
    encoder = model.modules[TEXT]
    batch = encoder.tokenize(["exported adapters must match", "exactly"])  # type: ignore[operator]
    fresh, _tok = _fresh_base()
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours = encoder.peft(**batch).last_hidden_state  # type: ignore[union-attr]
        theirs = loaded(**batch).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-6)
    head = export_component(model, "head.topic", tmp_path / "head")
    from safetensors.torch import load_file

    assert set(load_file(str(head[0]))) == {"weight", "bias"}


def test_cached_prefix_gives_the_same_output_as_the_full_model() -> None:
    spec = ModelSpec(TASKS, text_model="tiny", lora_layers=(1,))
    model = M3TModel.build(spec, [TEXT, "head.topic"], text_base=_fresh_base())
    trainer = LocalTrainer(model, {}, node_seed=0)
    _randomise(trainer, 9)
    encoder = model.modules[TEXT]
    texts = ["the cache must not change the result", "short one"]
    cached = encoder.encode_prefix(texts)  # type: ignore[operator]
    with torch.no_grad():
        full = encoder(texts)
        fast = encoder(cached)
    assert torch.allclose(full, fast, atol=1e-5)
    names = [n for n, _ in encoder.peft.named_parameters() if "lora_B" in n]  # type: ignore[union-attr]
    assert names and all(".layer.1." in n for n in names)


def test_a_request_to_make_up_trains_that_many_times_the_steps() -> None:
    """``TrainRequest.make_up`` k: the trainer runs k times its steps (a part-time member
    making up the rounds it skipped), each step logged as a loss."""
    rng = np.random.default_rng(1)
    images = rng.random((32, 1, 8, 8), dtype=np.float32)
    data = {"digits": TaskData({"image": images}, (images.mean(axis=(1, 2, 3)) > 0.5)
                               .astype(np.int64))}
    held = ["encoder.image", "backbone", "head.digits"]
    for k in (1, 3):
        trainer = LocalTrainer(M3TModel.build(SPEC, held), data, node_seed=2, steps=2)
        steps = []
        trainer.model.forward = _counting(trainer.model.forward, steps)  # type: ignore[method-assign]
        trainer.run(TrainRequest("backbone", 0, frozenset(held), 0, make_up=k))
        assert len(steps) == 2 * k


def _counting(forward: Any, calls: list[int]) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*args, **kwargs)
    return counted
