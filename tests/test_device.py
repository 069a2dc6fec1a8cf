"""[model] device and precision: the settings' checks, the device torch must see at start-up,
bfloat16 autocast, and the shadow mode a model off the CPU trains in (bit-identical to the
bound mode on the CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gossip.errors import ConfigError
from p2pfed.config import Config
from p2pfed.consensus import mix_into
from p2pfed.continual import ContinualSettings, Schedule
from p2pfed.model.continual import Continual
from p2pfed.model.device import CPU, resolve_device
from p2pfed.model.local import build_trainer
from p2pfed.model.m3t import (
    CachedTexts,
    M3TModel,
    ModelSpec,
    TaskSpec,
    load_text_base,
    share_frozen,
)
from p2pfed.model.train import LocalTrainer, TaskData, TrainRequest

TEXT = "encoder.text.lora"
TOPIC = TaskSpec("topic", ("text",), 3)
IMAGES = (TaskSpec("shapes", ("image",), 3, backbone=True),
          TaskSpec("shades", ("image",), 2, backbone=True))


@pytest.fixture(scope="module")
def tiny_base() -> tuple[torch.nn.Module, Any]:
    return load_text_base("tiny")


def _config(**model: object) -> Config:
    return Config.from_dict({"model": {"kind": "m3t", "text_model": "tiny", **model}})


# ---------------------------------------------------------------------------- the settings
@pytest.mark.parametrize(("key", "value", "words"), [
    ("device", "gpu", 'model.device must be "auto", "cpu", "cuda" or "cuda:N"'),
    ("device", "cuda:", "not 'cuda:'"), ("device", "cuda:x", "not 'cuda:x'"),
    ("device", "cuda:-1", "not 'cuda:-1'"), ("device", "CUDA", "not 'CUDA'"),
    ("device", "mps", "not 'mps'"), ("device", 0, "model.device must be a string"),
    ("precision", "fp16", "model.precision must be one of fp32, bf16, not 'fp16'"),
    ("precision", "bfloat16", "not 'bfloat16'"),
])
def test_config_refuses_a_device_or_precision_it_does_not_know(key: str, value: object,
                                                               words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        _config(**{key: value})


def test_a_config_naming_a_gpu_reads_on_a_machine_without_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _config(device="cuda:1", precision="bf16")  # (status, ledger: they build no model)
    assert (cfg.model.device, cfg.model.precision) == ("cuda:1", "bf16")
    assert (Config().model.device, Config().model.precision) == ("auto", "fp32")
    assert 'device = "auto"' in Config().to_toml()


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU  # (this machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU


def test_a_cuda_device_torch_does_not_see_is_refused_at_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _config(device="cuda")
    with pytest.raises(ConfigError, match=r'\[model\] device = "cuda", but torch sees no '
                                          r'CUDA device.*set device = "auto"'):
        build_trainer(cfg, [TEXT, "head.topic"], bytes(32), bytes(32), tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r'device = "cuda:2", but torch sees 2 CUDA '
                                          r"device\(s\): cuda:0 to cuda:1"):
        resolve_device("cuda:2")


# ---------------------------------------------------------------------------- bfloat16
def _topic_data(n: int = 48) -> TaskData:
    labels = np.arange(n) % 3
    words = ["apple pear plum", "river lake sea", "red blue green"]
    return TaskData({"text": [f"{words[k]} {i}" for i, k in enumerate(labels)]}, labels)


def _topic_trainer(base: tuple[torch.nn.Module, Any], precision: str, *, seed: int = 0,
                   shadow: bool | None = None) -> LocalTrainer:
    spec = ModelSpec((TOPIC,), text_model="tiny", lora_layers=(1,))
    model = M3TModel.build(spec, [TEXT, "head.topic"], init_seed=3, precision=precision,
                           text_base=(share_frozen(base[0]), base[1]))
    data = _topic_data()
    encoder = model.modules[TEXT]
    with model.autocast():
        cached = encoder.encode_prefix(data.inputs["text"])  # type: ignore[operator]
    data = TaskData({"text": cached}, data.labels)
    return LocalTrainer(model, {"topic": data}, node_seed=seed, steps=4, batch_size=16,
                        lr=3e-2, heldout={"topic": data.subset(np.arange(12))}, shadow=shadow)


def test_bf16_on_the_cpu_trains_and_keeps_everything_float32(
        tiny_base: tuple[torch.nn.Module, Any]) -> None:
    trainer = _topic_trainer(tiny_base, "bf16")
    cached = trainer.data["topic"].inputs["text"]
    assert isinstance(cached, CachedTexts) and cached.hidden.dtype == torch.float32
    batch, _ = trainer.data["topic"].batch(np.arange(4))
    logits = trainer.model.forward("topic", batch)
    assert logits.dtype == torch.float32 and logits.device == CPU
    losses = [trainer.run(TrainRequest("head.topic", r, ready=frozenset({TEXT})))
              for r in range(6)]
    assert losses[-1] < losses[0]
    for name, flat in trainer.flats.items():
        assert flat.flat.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters_of(name).values())
        assert flat.is_bound(trainer.model.parameters_of(name))  # (on the CPU: zero copy)


def test_an_fp32_and_a_bf16_member_mix_exactly(tiny_base: tuple[torch.nn.Module, Any]) -> None:
    full, half = _topic_trainer(tiny_base, "fp32"), _topic_trainer(tiny_base, "bf16", seed=1)
    for trainer in (full, half):
        trainer.run(TrainRequest("head.topic", 0, ready=frozenset({TEXT})))
    for name in full.flats:
        a, b = full.flats[name], half.flats[name]
        assert a.layout == b.layout and a.fingerprint() != b.fingerprint()
        out = torch.empty_like(a.flat)
        mix_into(out, [(0.5, a.flat), (0.5, b.flat)])
        expected = (a.flat.double() * 0.5 + b.flat.double() * 0.5).float()
        assert torch.equal(out, expected)  # (what mixing two float32 members always gave)
        a.load_(out)
        b.load_(out)
    batch, _ = full.data["topic"].batch(np.arange(8))
    same, close = full.model.forward("topic", batch), half.model.forward("topic", batch)
    assert not torch.equal(same, close) and torch.allclose(same, close, atol=0.05)


# ---------------------------------------------------------------------------- shadow mode
def test_shadow_mode_gives_the_bound_modes_numbers_bit_for_bit(
        tiny_base: tuple[torch.nn.Module, Any]) -> None:
    bound, shadow = (_topic_trainer(tiny_base, "fp32", shadow=s) for s in (False, True))
    assert all(not f.is_bound(shadow.model.parameters_of(n)) for n, f in shadow.flats.items())
    for round_ in range(3):
        for trainer in (bound, shadow):
            trainer.train("head.topic", 3 * round_)  # alone: the text encoder a snapshot
            trainer.run(TrainRequest(TEXT, 3 * round_ + 1, ready=frozenset({"head.topic"})))
            flat = trainer.flats[TEXT]  # a neighbour's state mixed in meanwhile
            flat.load_(flat.flat * 0.75 + 0.01)
        for name in bound.flats:
            assert torch.equal(bound.flats[name].flat, shadow.flats[name].flat), name
        assert bound.progress == shadow.progress
        held = bound.heldout["topic"]
        assert np.array_equal(bound.correct("topic", held), shadow.correct("topic", held))


def _image_trainer(shadow: bool) -> LocalTrainer:
    rng = np.random.default_rng(5)
    data = {}
    for task in IMAGES:
        images = rng.random((40, 1, 6, 6), dtype=np.float32)
        data[task.name] = TaskData({"image": images},
                                   (images.sum(axis=(1, 2, 3)) * 7).astype(np.int64)
                                   % task.classes)
    model = M3TModel.build(ModelSpec(IMAGES), ["backbone", "encoder.image", "head.shades",
                                               "head.shapes"], init_seed=2)
    continual = Continual(Schedule({"shapes": 0, "shades": 2}),
                          ContinualSettings(method="ewc", ewc_lambda=5.0, fisher_batches=2), 9)
    return LocalTrainer(model, data, node_seed=4, steps=3, batch_size=8, lr=2e-2,
                        continual=continual, shadow=shadow)


def test_ewc_in_shadow_mode_gives_the_bound_modes_numbers() -> None:
    bound, shadow = _image_trainer(False), _image_trainer(True)
    everything = frozenset(bound.trainable())
    for round_ in range(5):
        for trainer in (bound, shadow):
            trainer.run(TrainRequest("backbone", round_, ready=everything))
    assert bound.continual is not None and shadow.continual is not None
    assert bound.continual.anchors() == shadow.continual.anchors() != {}
    for name in bound.flats:
        assert torch.equal(bound.flats[name].flat, shadow.flats[name].flat), name
