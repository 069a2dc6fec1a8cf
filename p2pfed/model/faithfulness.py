"""Deleting what an explanation points at: the model's probabilities with inputs masked.

An attribution is *faithful* when deleting what it ranks highest moves the prediction more
than deleting what it ranks lowest (or a random part of the same size).  "Deleting" here is
masking to the baseline :func:`p2pfed.model.explain.explain` integrates from, so the two
agree on what "absent" means: a whole modality becomes zeros (an image, an activity trace)
or, for a text, every word becomes ``[PAD]``; single tokens of a text become ``[PAD]``.  The
specials (``[CLS]``, ``[SEP]``) are always kept and the attention mask is the original one,
as in the baseline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from p2pfed.model.explain import EmbeddedText, check_example, evaluating
from p2pfed.model.m3t import ENCODERS, TEXT, M3TModel, TextEncoder


def word_positions(model: M3TModel, text: str) -> list[int]:
    """The positions, among the text's tokens (as :attr:`Explanation.tokens` lists them), of
    those that are not specials: the ones masking may replace."""
    encoder = _text_encoder(model)
    ids = encoder.tokenize([text])["input_ids"][0].tolist()
    specials = set(encoder.tokenizer.all_special_ids)
    return [i for i, token in enumerate(ids) if token not in specials]


def masked_probabilities(model: M3TModel, task: str, example: Mapping[str, Any], *,
                         modalities: Collection[str] = (),
                         tokens: Collection[int] = ()) -> list[float]:
    """The class probabilities (float64) of one ``example`` with ``modalities`` masked whole
    and the text's tokens at ``tokens`` (positions as :func:`word_positions` gives them)
    replaced by ``[PAD]``; nothing masked: the model's own probabilities.  ValueError for a
    modality the task does not have, or a position that is not a word of the text."""
    if task not in model.tasks():
        raise ValueError(f"the model has no task {task!r}")
    spec = model.spec.task(task)
    unknown = sorted(set(modalities) - set(spec.modalities))
    if unknown:
        raise ValueError(f"task {task} has no modality {', '.join(unknown)}")
    inputs = check_example(model, spec, example)
    if tokens and TEXT not in inputs:
        raise ValueError(f"task {task} has no text to mask tokens of")
    values: dict[str, torch.Tensor] = {}
    modules = dict(model.modules)
    with evaluating(model), torch.no_grad():
        for m in spec.modalities:
            if m != TEXT:
                values[m] = torch.zeros_like(inputs[m]) if m in modalities else inputs[m]
                continue
            encoder = _text_encoder(model)
            batch = encoder.tokenize([inputs[TEXT]])
            ids = batch["input_ids"].clone()
            words = set(word_positions(model, inputs[TEXT]))
            masked = words if m in modalities else set(tokens)
            if not masked <= words:
                raise ValueError(f"positions {sorted(masked - words)} are not words of the text")
            for i in masked:
                ids[0, i] = int(encoder.tokenizer.pad_token_id)
            base: Any = encoder.peft.get_base_model()
            values[m] = base.get_input_embeddings()(ids)
            modules[ENCODERS[TEXT]] = EmbeddedText(encoder, batch["attention_mask"])
        logits = M3TModel(model.spec, model.held, modules).forward(task, values)
    probabilities: list[float] = torch.softmax(logits.double(), dim=-1)[0].tolist()
    return probabilities


def _text_encoder(model: M3TModel) -> TextEncoder:
    encoder = model.modules.get(ENCODERS[TEXT])
    if not isinstance(encoder, TextEncoder):
        raise ValueError("the model has no text encoder")
    return encoder
