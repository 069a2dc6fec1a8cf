"""Explaining one prediction: integrated gradients per modality, components against their
federation-initial values (tiny models, CPU)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from p2pfed.model.explain import Explanation, explain
from p2pfed.model.m3t import M3TModel, ModelSpec, TaskSpec, load_text_base

TASKS = (TaskSpec("digits", ("image",), 10, backbone=True), TaskSpec("topic", ("text",), 4),
         TaskSpec("engagement", ("activity", "text"), 3, backbone=True))
SPEC = ModelSpec(TASKS, text_model="tiny")
TEXT = "encoder.text.lora"
SCALE = 0.1
HOLDS = {
    "topic": [TEXT, "head.topic"],
    "digits": ["encoder.image", "backbone", "head.digits"],
    "engagement": ["encoder.activity", TEXT, "backbone", "head.engagement"],
}
NOTE = "the student asked about fractions twice"
IMAGE = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)
TRACE = np.random.default_rng(3).random((1, 6, 4), dtype=np.float32)
EXAMPLES: dict[str, dict[str, Any]] = {
    "topic": {"text": [NOTE]},
    "digits": {"image": IMAGE},
    "engagement": {"activity": TRACE, "text": [NOTE]},
}


def _build(task: str) -> M3TModel:
    held = HOLDS[task]
    base = load_text_base("tiny") if TEXT in held else None
    return M3TModel.build(SPEC, held, text_base=base)


def _trained(task: str) -> M3TModel:
    """The task's model with every component moved away from its initial values."""
    model = _build(task)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for component in model.held:
            for p in model.parameters_of(component).values():
                p.add_(torch.randn(p.shape, generator=gen) * SCALE)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, M3TModel]:
    return {task: _trained(task) for task in HOLDS}


@pytest.fixture(scope="module")
def explained(models: dict[str, M3TModel]) -> dict[str, Explanation]:
    return {task: explain(models[task], task, EXAMPLES[task]) for task in HOLDS}


def _direct(model: M3TModel, task: str) -> list[float]:
    inputs = {m: v if m == "text" else torch.from_numpy(v) for m, v in EXAMPLES[task].items()}
    with torch.no_grad():
        return torch.softmax(model.forward(task, inputs).double(), -1)[0].tolist()


def test_a_text_prediction_has_one_attribution_per_token(
        models: dict[str, M3TModel], explained: dict[str, Explanation]) -> None:
    e = explained["topic"]
    assert e.tokens is not None and e.tokens[0] == "[CLS]" and e.tokens[-1] == "[SEP]"
    assert "fraction" in "".join(e.tokens)
    assert len(e.inputs["text"]) == len(e.tokens) and e.shapes["text"] == (len(e.tokens),)
    assert e.inputs["text"][0] == 0.0 and e.inputs["text"][-1] == 0.0  # specials = baseline
    assert set(e.modalities) == {"text"} and e.modalities["text"] == pytest.approx(1.0)
    assert e.probabilities == pytest.approx(_direct(models["topic"], "topic"), abs=1e-6)
    assert e.predicted == int(np.argmax(e.probabilities))
    assert e.probability == e.probabilities[e.predicted]


def test_an_image_prediction_has_one_attribution_per_pixel(
        models: dict[str, M3TModel], explained: dict[str, Explanation]) -> None:
    e = explained["digits"]
    assert e.tokens is None and e.shapes == {"image": (8, 8)} and len(e.inputs["image"]) == 64
    assert e.modalities == {"image": pytest.approx(1.0)}
    assert e.probabilities == pytest.approx(_direct(models["digits"], "digits"), abs=1e-6)
    # any of the accepted layouts of one image gives the same numbers
    assert explain(models["digits"], "digits", {"image": IMAGE[0, 0]}) == e


def test_a_multimodal_prediction_shares_among_its_modalities(
        models: dict[str, M3TModel], explained: dict[str, Explanation]) -> None:
    e = explained["engagement"]
    assert set(e.inputs) == {"activity", "text"} and e.shapes["activity"] == (6,)
    assert len(e.inputs["text"]) == len(e.tokens or [])
    assert set(e.modalities) == {"activity", "text"}
    assert all(share > 0 for share in e.modalities.values())
    assert e.probabilities == pytest.approx(_direct(models["engagement"], "engagement"),
                                            abs=1e-6)
    # the shares are those of the reported numbers
    magnitude = {m: sum(abs(x) for x in v) for m, v in e.inputs.items()}
    for m, share in e.modalities.items():
        assert share == pytest.approx(magnitude[m] / sum(magnitude.values()), abs=1e-9)


@pytest.mark.parametrize("task", list(HOLDS))
def test_shares_sum_to_one_and_attributions_are_complete(
        task: str, explained: dict[str, Explanation]) -> None:
    e = explained[task]
    assert all(share >= 0 for share in e.modalities.values())
    assert abs(sum(e.modalities.values()) - 1.0) <= 1e-6
    assert all(math.isfinite(x) for v in e.inputs.values() for x in v)
    # completeness: the attributions sum to p(x) − p(baseline), up to the integration error
    total = sum(sum(v) for v in e.inputs.values())
    gap = e.probability - e.baseline_probability
    assert total - gap == pytest.approx(e.delta, abs=1e-5)
    assert abs(e.delta) <= 0.1 * abs(gap) + 1e-4, (e.delta, gap)


def test_the_baselines_are_a_blank_image_and_the_text_with_every_word_padded(
        models: dict[str, M3TModel], explained: dict[str, Explanation]) -> None:
    e = explained["digits"]
    with torch.no_grad():
        blank = models["digits"].forward("digits", {"image": torch.zeros(1, 1, 8, 8)})
    assert e.baseline_probability == pytest.approx(
        float(torch.softmax(blank, -1)[0, e.predicted]), abs=1e-6)
    e = explained["topic"]
    padded = " ".join(["[PAD]"] * (len(e.tokens or []) - 2))  # [CLS] [PAD]… [SEP], all attended
    with torch.no_grad():
        logits = models["topic"].forward("topic", {"text": [padded]})
    assert e.baseline_probability == pytest.approx(
        float(torch.softmax(logits, -1)[0, e.predicted]), abs=1e-6)


@pytest.mark.parametrize("task", list(HOLDS))
def test_components_cover_the_pipeline(task: str, models: dict[str, M3TModel],
                                       explained: dict[str, Explanation]) -> None:
    e = explained[task]
    assert sorted(e.components) == sorted(TASKS[[t.name for t in TASKS].index(task)].pipeline())
    assert sorted(e.components) == sorted(models[task].held)
    assert any(abs(v) > 1e-6 for v in e.components.values())  # trained values do matter
    same = explain(models[task], task, EXAMPLES[task], initial=models[task])
    assert same.components == dict.fromkeys(e.components, 0.0)


def test_a_model_at_its_initial_values_moves_nothing() -> None:
    """``initial=None`` rebuilds the components from the model's federation seed."""
    model = _build("engagement")
    e = explain(model, "engagement", EXAMPLES["engagement"])
    assert e.components == dict.fromkeys(HOLDS["engagement"], 0.0)


def test_the_same_arguments_give_the_same_numbers(
        models: dict[str, M3TModel], explained: dict[str, Explanation]) -> None:
    model = models["engagement"]
    for module in model.modules.values():
        module.train()
    again = explain(model, "engagement", EXAMPLES["engagement"])
    assert again == explained["engagement"]
    assert all(module.training for module in model.modules.values())  # modes restored
    assert all(p.grad is None for c in model.held for p in model.parameters_of(c).values())


def test_bad_input_is_a_value_error_naming_what_is_missing(
        models: dict[str, M3TModel]) -> None:
    model = models["engagement"]
    with pytest.raises(ValueError, match=r"no task 'digits' \(its tasks: engagement\)"):
        explain(model, "digits", EXAMPLES["digits"])
    with pytest.raises(ValueError, match="needs the modalities activity, text; "
                                         "the example lacks text"):
        explain(model, "engagement", {"activity": TRACE})
    with pytest.raises(ValueError, match="one trace of steps × 4 features"):
        explain(model, "engagement", {"activity": TRACE[..., :3], "text": NOTE})
    for text in ([NOTE, NOTE], 5):
        with pytest.raises(ValueError, match="one string"):
            explain(model, "engagement", {"activity": TRACE, "text": text})
    with pytest.raises(ValueError, match="one channel"):
        explain(models["digits"], "digits", {"image": np.zeros((1, 3, 8, 8))})
    with pytest.raises(ValueError, match=r"initial model lacks encoder\.activity"):
        explain(model, "engagement", EXAMPLES["engagement"], initial=models["topic"])
