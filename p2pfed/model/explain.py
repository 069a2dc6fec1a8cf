"""Why the model predicts what it does for one example: by input and by component.

:func:`explain` runs a model on one example and returns its prediction with two kinds of
numbers, both about the probability ``p`` the model gives its predicted class:

* **Input attributions** — integrated gradients (captum's ``IntegratedGradients``), over all
  of the task's modalities at once, along the straight path from a *baseline* (every modality
  at once) to the example.  Baselines: zeros for an image and an activity trace; for a text,
  the same tokens with every word replaced by ``[PAD]`` (``[CLS]`` and ``[SEP]`` kept), taken
  at the output of the text model's word embeddings (its token vectors, before the position
  embeddings).  An attribution is reported per token (summed over the embedding's
  coordinates), per pixel (row-major, its shape in ``shapes``) and per step of a trace
  (summed over its features); ``tokens`` are the text's tokens, the specials included, whose
  attribution is exactly 0 (they equal the baseline).  The attributions sum to
  ``p − p(baseline)`` up to ``delta``, the integration error (the *completeness* of
  integrated gradients).  A modality's share is the sum of its reported attributions'
  absolute values over that sum for all modalities (all 0 when every attribution is 0).
* **Component attributions** — per component of the task's pipeline, ``p`` minus the
  probability of the same class when that component's trained values (those it mixes, for
  the text encoder its adapters and projection) are replaced by their federation-initial
  values: how much the federation's training of that component moves this prediction.  It
  may be negative; the replacements are one at a time, so the numbers need not add up.

Attributions are not causes.  An input attribution says how the output changes along one
path from one chosen baseline (another baseline gives other numbers), and a component
attribution says what the output would be with that one component untrained; neither says
why the world is as the prediction says, nor that a student would be judged differently if an
input changed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients  # type: ignore[import-untyped]
from torch import nn

from p2pfed.model.m3t import ACTIVITY, ENCODERS, IMAGE, TEXT, M3TModel, TaskSpec, TextEncoder, pool


@dataclass(frozen=True)
class Explanation:
    task: str
    predicted: int  # class index
    probability: float  # softmax probability of the predicted class
    probabilities: list[float]
    #: modality -> share of the total |attribution| (sum to 1, or all 0)
    modalities: dict[str, float]
    #: modality -> attribution per token (text), per pixel (image, row-major), per step (activity)
    inputs: dict[str, list[float]]
    shapes: dict[str, tuple[int, ...]]
    tokens: list[str] | None  # the text's tokens (specials included) when text is an input
    #: component -> drop in the predicted class's probability when it is replaced by its
    #: federation-initial values (may be negative)
    components: dict[str, float]
    baseline_probability: float  # the predicted class's probability at the baseline
    delta: float  # sum of all attributions − (probability − baseline_probability)


def explain(model: M3TModel, task: str, example: Mapping[str, Any], *,
            initial: M3TModel | None = None, steps: int = 32, seed: int = 0) -> Explanation:
    """Explain ``model``'s prediction for one ``example`` of ``task`` (see the module's doc).

    ``example``: the task's modalities, one example each (a text as a string or a list of one;
    an image (H,W), (1,H,W) or (1,1,H,W); a trace (T,F) or (1,T,F); arrays or tensors).
    ``initial``: the components as the federation starts them (built from the federation id
    like the model, before any training); None: built here from ``model.spec``, whose
    ``lora_seed`` is the federation seed, as :func:`p2pfed.model.local.build_model` builds
    them.  ``steps``: integration steps.  The same arguments give the same numbers.
    :class:`ValueError` for a task the model does not have or an example that lacks one of
    its modalities or has the wrong shape.
    """
    if task not in model.tasks():
        raise ValueError(f"the model has no task {task!r} (its tasks: "
                         f"{', '.join(model.tasks()) or 'none'})")
    spec = model.spec.task(task)
    inputs = check_example(model, spec, example)
    with torch.random.fork_rng(devices=[]), evaluating(model):
        torch.manual_seed(seed)
        probs = _probabilities(model, task, inputs)
        predicted = int(torch.argmax(probs))
        attributions, baseline_p, delta = _integrated_gradients(model, spec, inputs, predicted,
                                                                steps)
        if initial is None:
            initial = M3TModel.build(model.spec, spec.pipeline(), init_seed=model.spec.lora_seed)
        components = {c: float(probs[predicted]) - float(
            _probabilities(_replaced(model, initial, c), task, inputs)[predicted])
            for c in spec.pipeline()}
    flat = {m: a.flatten().tolist() for m, a in attributions.items()}
    magnitude = {m: float(np.abs(np.asarray(v)).sum()) for m, v in flat.items()}
    total = sum(magnitude.values())
    tokens = None
    if TEXT in inputs:
        encoder = model.modules[ENCODERS[TEXT]]
        assert isinstance(encoder, TextEncoder)
        ids = encoder.tokenize([inputs[TEXT]])["input_ids"][0].tolist()
        tokens = list(encoder.tokenizer.convert_ids_to_tokens(ids))
    return Explanation(
        task=task, predicted=predicted, probability=float(probs[predicted]),
        probabilities=probs.tolist(),
        modalities={m: magnitude[m] / total if total > 0 else 0.0 for m in spec.modalities},
        inputs=flat, shapes={m: tuple(a.shape) for m, a in attributions.items()},
        tokens=tokens, components=components, baseline_probability=baseline_p, delta=delta)


# ---------------------------------------------------------------------------- the example
def check_example(model: M3TModel, spec: TaskSpec, example: Mapping[str, Any]) -> dict[str, Any]:
    """The example's inputs: a text as a string, an image (1,1,H,W), a trace (1,T,F)."""
    missing = [m for m in spec.modalities if m not in example]
    if missing:
        raise ValueError(f"task {spec.name} needs the modalities {', '.join(spec.modalities)}; "
                         f"the example lacks {', '.join(missing)}")
    out: dict[str, Any] = {}
    for m in spec.modalities:
        value = example[m]
        if m == TEXT:
            if not isinstance(value, str):
                if not isinstance(value, list | tuple) or len(value) != 1 \
                        or not isinstance(value[0], str):
                    raise ValueError("text: one string (or a list of one) to explain")
                value = value[0]
            out[m] = value
            continue
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if m == IMAGE:
            while tensor.dim() < 4:
                tensor = tensor.unsqueeze(0)
            if tensor.shape[:2] != (1, 1) or min(tensor.shape[2:]) < 2:
                raise ValueError(f"image of shape {tuple(np.shape(value))}: one example, one "
                                 "channel (grey levels), at least 2×2 pixels")
        elif m == ACTIVITY:
            tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor
            if (tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[1] < 1
                    or tensor.shape[2] != model.spec.activity_features):
                raise ValueError(f"activity of shape {tuple(np.shape(value))}: one trace of "
                                 f"steps × {model.spec.activity_features} features")
        out[m] = tensor
    return out


@contextmanager
def evaluating(model: M3TModel) -> Iterator[None]:
    """Every module in eval mode (no dropout) for the duration; their modes restored after."""
    modes = {name: module.training for name, module in model.modules.items()}
    try:
        for module in model.modules.values():
            module.eval()
        yield
    finally:
        for name, mode in modes.items():
            model.modules[name].train(mode)


def _probabilities(model: M3TModel, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The class probabilities (float64) of one example."""
    batch = {m: [v] if m == TEXT else v for m, v in inputs.items()}
    with torch.no_grad():
        logits = model.forward(task, batch)
    return torch.softmax(logits.double(), dim=-1)[0]


# ---------------------------------------------------------------------------- inputs
class EmbeddedText(nn.Module):
    """The text encoder fed word embeddings (N,T,H) of one text's tokens instead of strings."""

    def __init__(self, encoder: TextEncoder, mask: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask = mask

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        mask = self.mask.expand(embeds.shape[0], -1)
        hidden = self.encoder.peft(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # (pooled as TextEncoder.forward pools)
        out: torch.Tensor = self.encoder.proj(pool(hidden, mask, self.encoder.family.pooling))
        return out


def _integrated_gradients(model: M3TModel, spec: TaskSpec, inputs: Mapping[str, Any],
                          target: int, steps: int
                          ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Per modality its attributions (per token (T,), pixel (H,W), step (T,)), the target's
    probability at the baseline and the convergence delta."""
    modules = dict(model.modules)
    values, baselines = [], []
    for m in spec.modalities:
        if m == TEXT:
            encoder = model.modules[ENCODERS[TEXT]]
            assert isinstance(encoder, TextEncoder)
            batch = encoder.tokenize([inputs[TEXT]])
            ids = batch["input_ids"]
            specials = set(encoder.tokenizer.all_special_ids)
            special = torch.tensor([i in specials for i in ids[0].tolist()])
            blank = torch.where(special, ids, int(encoder.tokenizer.pad_token_id))
            base: Any = encoder.peft.get_base_model()
            embed = base.get_input_embeddings()
            with torch.no_grad():
                values.append(embed(ids).detach())
                baselines.append(embed(blank).detach())
            modules[ENCODERS[TEXT]] = EmbeddedText(encoder, batch["attention_mask"])
        else:
            values.append(inputs[m])
            baselines.append(torch.zeros_like(inputs[m]))
    embedded = M3TModel(model.spec, model.held, modules)

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        logits = embedded.forward(spec.name, dict(zip(spec.modalities, tensors, strict=True)))
        return torch.softmax(logits, dim=-1)

    with torch.no_grad():
        baseline_p = float(forward(*baselines)[0, target])
    attrs, delta = IntegratedGradients(forward).attribute(
        tuple(values), baselines=tuple(baselines), target=target, n_steps=steps,
        return_convergence_delta=True)
    out = {}
    for m, attr in zip(spec.modalities, attrs, strict=True):
        a = attr.detach().double()[0]
        out[m] = a.sum(-1) if m in (TEXT, ACTIVITY) else a.sum(0)  # tokens/steps; (H,W)
    return out, baseline_p, float(delta[0])


# ---------------------------------------------------------------------------- components
def _replaced(model: M3TModel, initial: M3TModel, component: str) -> M3TModel:
    """A copy of ``model`` whose ``component`` has ``initial``'s values (the model's own
    modules, frozen tensors and tokenizer are shared, never written)."""
    if component not in initial.modules:
        raise ValueError(f"the initial model lacks {component} (it holds "
                         f"{', '.join(initial.held)})")
    module = model.modules[component]
    own = {id(p) for p in model.parameters_of(component).values()}
    shared: dict[int, Any] = {id(t): t for t in [*module.parameters(), *module.buffers()]
                              if id(t) not in own}
    if isinstance(module, TextEncoder):
        shared[id(module.tokenizer)] = module.tokenizer
    modules = dict(model.modules)
    modules[component] = copy.deepcopy(module, shared)
    replaced = M3TModel(model.spec, model.held, modules)
    start = initial.parameters_of(component)
    with torch.no_grad():
        for name, p in replaced.parameters_of(component).items():
            if name not in start or start[name].shape != p.shape:
                raise ValueError(f"the initial model's {component} differs from the model's "
                                 f"(parameter {name})")
            p.copy_(start[name])
    return replaced
