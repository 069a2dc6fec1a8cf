"""A local Hugging Face model as the text base: a tiny BERT-like encoder and a tiny LLaMA-like
decoder, saved to a directory as a member would have them (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gossip.errors import ConfigError
from p2pfed.consensus import mix_into
from p2pfed.model.export import export_parts
from p2pfed.model.m3t import M3TModel, ModelSpec, TaskSpec, TextEncoder, load_text_base
from p2pfed.model.textbase import adapted_modules, family, identity
from p2pfed.model.train import LocalTrainer, TaskData
from tests.tiny_hf import FAMILIES, save_tiny

TEXT = "encoder.text.lora"
TASKS = (TaskSpec("topic", ("text",), 4),)
TEXTS = ["what is a prime number", "photosynthesis in green leaves", "the french revolution",
         "solve x plus two equals five"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: save_tiny(root / f, f) for f in FAMILIES}


def _build(path: Path, **spec: Any) -> M3TModel:
    settings: dict[str, Any] = {"text_model": str(path), "lora_layers": (-1,), **spec}
    return M3TModel.build(ModelSpec(TASKS, **settings), [TEXT, "head.topic"],
                          text_base=load_text_base(str(path)))


def _encoder(model: M3TModel) -> TextEncoder:
    encoder = model.modules[TEXT]
    assert isinstance(encoder, TextEncoder)
    return encoder


def _randomise(trainer: LocalTrainer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for flat in trainer.flats.values():
        flat.flat.copy_(torch.randn(flat.flat.shape, generator=gen) * 0.1)


@pytest.mark.parametrize(("name", "kind", "targets", "pooling"),
                         [("bert", "encoder", ("query", "value"), "mean"),
                          ("llama", "decoder", ("q_proj", "v_proj"), "last")])
def test_each_family_gets_its_adapter_targets_and_pooling(
        models: dict[str, Path], name: str, kind: str, targets: tuple[str, ...],
        pooling: str) -> None:
    base, _tok = load_text_base(str(models[name]))
    fam = family(base)
    assert (fam.kind, fam.targets, fam.pooling, fam.depth) == (kind, targets, pooling, 2)
    top = adapted_modules(base, fam.targets, [1])
    assert len(top) == 2 and all(".1." in f".{n}" for n in top)  # (-1: the top layer only)
    assert len(adapted_modules(base, fam.targets, None)) == 4
    lora = [n for n, _ in _encoder(_build(models[name])).peft.named_parameters() if "lora_B" in n]
    assert len(lora) == 2 and all(".1." in n for n in lora)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_text_pools_the_same_alone_or_padded_in_a_batch(models: dict[str, Path],
                                                          name: str) -> None:
    model = _build(models[name])
    _randomise(LocalTrainer(model, {}, node_seed=0), 3)
    encoder = _encoder(model)
    with torch.no_grad():
        together = encoder(["hi", TEXTS[3]])
        alone = encoder(["hi"])
        cached = encoder(encoder.encode_prefix(["hi", TEXTS[3]]))
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    assert torch.allclose(together, cached, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_local_model_trains_the_topic_head(models: dict[str, Path], name: str) -> None:
    model = _build(models[name])
    encoder = _encoder(model)
    labels = np.array([0, 1, 2, 3] * 4)
    data = TaskData({"text": encoder.encode_prefix(TEXTS * 4)}, labels)
    trainer = LocalTrainer(model, {"topic": data}, node_seed=1, steps=15, batch_size=16, lr=0.01)
    before = trainer.flats[TEXT].flat.clone()
    first = trainer.train_round([TEXT, "head.topic"], 0)
    last = trainer.train_round([TEXT, "head.topic"], 1)
    assert last < first
    assert not torch.equal(before, trainer.flats[TEXT].flat)  # the adapter trained too
    assert trainer.accuracy("topic", data) == 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_mixing_the_adapters_of_a_local_model_mixes_their_updates_exactly(
        models: dict[str, Path], name: str) -> None:
    trainers = []
    for i in range(3):
        trainer = LocalTrainer(_build(models[name]), {}, node_seed=i)
        _randomise(trainer, i)
        trainers.append(trainer)
    deltas = [_encoder(t.model).delta_weights() for t in trainers]
    weights = [0.5, 0.3, 0.2]
    expected = {k: sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k in deltas[0]}
    out = torch.empty_like(trainers[0].flats[TEXT].flat)
    mix_into(out, [(w, t.flats[TEXT].flat) for w, t in zip(weights, trainers, strict=True)])
    trainers[0].flats[TEXT].load_(out)
    mixed = _encoder(trainers[0].model).delta_weights()
    assert len(mixed) == 2
    assert max(float((mixed[k] - expected[k]).abs().max().detach()) for k in expected) <= 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_an_exported_adapter_loads_with_peft_and_gives_the_same_predictions(
        models: dict[str, Path], name: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = _build(models[name])
    _randomise(LocalTrainer(model, {}, node_seed=0), 11)
    export_parts(model, [TEXT, "head.topic"], tmp_path / "out", 4)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == name  # (the model's name, not where it is)
    assert "BASE_DIR" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    text = PeftModel.from_pretrained(AutoModel.from_pretrained(str(models[name])),
                                     str(tmp_path / "out")).eval()
    proj = load_file(str(tmp_path / "out" / "projection.safetensors"))
    head = load_file(str(tmp_path / "out" / "head.topic.safetensors"))
    encoder = _encoder(model)
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        hidden = text(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if name == "llama":
            pooled = hidden[torch.arange(len(TEXTS)), mask.sum(1) - 1]
        else:
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        x = pooled @ proj["proj.weight"].T + proj["proj.bias"]
        theirs = x @ head["weight"].T + head["bias"]
        ours = model.forward("topic", {"text": TEXTS})
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_identity_tells_same_shaped_models_apart(models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    def of(path: Path, layers: tuple[int, ...]) -> dict[str, Any]:
        base, _tok = load_text_base(str(path))
        return identity(base, str(path), targets=(), layers=layers, rank=8, alpha=16,
                        mode="frozen-a")

    again = save_tiny(tmp_path / "again", "llama")  # the same model saved once more
    other = save_tiny(tmp_path / "other", "llama", seed=99)  # same shapes, other weights
    mine = of(models["llama"], (-1,))
    assert of(again, (1,))["digest"] == mine["digest"]  # (-1 is layer 1 of two)
    assert of(other, (-1,))["digest"] != mine["digest"]
    assert of(models["llama"], (0,))["digest"] != mine["digest"]
    assert mine["summary"].startswith("llama: llama decoder, 2 layers of 32")


def test_a_text_model_that_is_not_there_or_not_a_model_is_a_clear_error(
        models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        load_text_base(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_text_base(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{\"model_type\": \"nonesuch\"}")
    with pytest.raises(ConfigError, match="cannot load it as a Hugging Face model"):
        load_text_base(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match=r"lora_layers \[2\]: this text model has layers 0\.\.1"):
        _build(models["llama"], lora_layers=(2,))
    with pytest.raises(ConfigError, match="has no linear layer named query"):
        _build(models["llama"], lora_targets=("query",))


def test_a_prediction_of_a_local_decoder_is_explained_token_by_token(
        models: dict[str, Path]) -> None:
    from p2pfed.model.explain import explain

    model = _build(models["llama"])
    _randomise(LocalTrainer(model, {}, node_seed=0), 5)
    exp = explain(model, "topic", {"text": TEXTS[1]}, steps=16)
    assert exp.tokens is not None and len(exp.inputs["text"]) == len(exp.tokens)
    assert any(exp.inputs["text"])  # the words moved the prediction
    # the attributions add up to what the text moved, up to the integration's error
    moved = exp.probability - exp.baseline_probability
    assert abs(exp.delta) < 0.05 * max(abs(moved), 1e-3) + 1e-3


def test_a_model_saved_in_bf16_trains_in_fp32_and_keeps_its_identity(
        models: dict[str, Path], tmp_path: Path) -> None:
    """Hub LLMs are mostly saved in bfloat16: the frozen base is made float32 on loading, so a
    member with the default precision trains on it, and the same weights saved in bf16 or in
    float32 are the same model."""
    half = save_tiny(tmp_path / "half", "llama", dtype=torch.bfloat16)
    full = save_tiny(tmp_path / "full", "llama", dtype=torch.bfloat16)
    base, _tok = load_text_base(str(full))  # (bf16 weights, upcast) saved again in float32
    base.save_pretrained(str(full))
    model = _build(half)
    data = TaskData({"text": _encoder(model).encode_prefix(TEXTS)}, np.arange(4))
    trainer = LocalTrainer(model, {"topic": data}, node_seed=1, steps=2, batch_size=4)
    assert np.isfinite(trainer.train_round([TEXT, "head.topic"], 0))

    def of(path: Path) -> str:
        loaded, _ = load_text_base(str(path))
        return str(identity(loaded, str(path), targets=(), layers=(-1,), rank=8, alpha=16,
                            mode="frozen-a")["digest"])

    assert of(half) == of(full)


def test_the_identity_is_the_models_not_the_class_it_was_saved_from(tmp_path: Path) -> None:
    """A LLaMA from the Hub (saved with its language-model head) and the same weights saved
    as a bare model differ only in their config's ``architectures``: the same model."""
    lm = save_tiny(tmp_path / "lm", "llama", causal_lm=True)
    bare = tmp_path / "bare"
    base, tokenizer = load_text_base(str(lm))
    base.save_pretrained(str(bare))
    tokenizer.save_pretrained(str(bare))
    digests = []  # (the targets named in another order are the same adapter)
    for path, targets in ((lm, ("v_proj", "q_proj")), (bare, ())):
        loaded, _ = load_text_base(str(path))
        digests.append(identity(loaded, str(path), targets=targets, layers=(-1,),
                                rank=8, alpha=16, mode="frozen-a")["digest"])
    assert digests[0] == digests[1]


def test_models_it_cannot_adapt_are_refused_clearly(tmp_path: Path) -> None:
    from transformers import BartConfig, BartModel

    with pytest.raises(ConfigError, match="absolute path"):
        load_text_base("models/llama")
    bart = tmp_path / "bart"
    BartModel(BartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
              ).save_pretrained(str(bart))
    base = BartModel.from_pretrained(str(bart))
    with pytest.raises(ConfigError, match="encoder-decoder model"):
        family(base)
