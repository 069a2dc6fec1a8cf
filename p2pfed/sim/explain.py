"""The simulator's ``--explain N``: explain held-out predictions at the end of an education run,
and check that the explanations point at what the model uses (the report's ``explain``).

Per task, the node that explains is the **first holder of the task's head in sorted name
order** among the nodes that end the run as members; it explains the **first N examples of
the task's held-out test set** (fewer when the set is smaller) with
:func:`p2pfed.model.explain.explain`, its components compared with their federation-initial
values.  Two faithfulness checks, each about the probability ``p`` of the predicted class, a
*drop* being ``p`` minus that probability once something is deleted (masked to the explain
baseline: :mod:`p2pfed.model.faithfulness`):

* ``modality_top_beats_least`` — over the examples of a task with several modalities (here
  engagement: activity and text), the fraction where deleting the modality with the largest
  share drops ``p`` more than deleting the one with the smallest share (an example whose
  shares are equal is not counted: ``modality_ties``);
* ``text_top_vs_random`` — over the examples with a text, the mean drop when the top
  ``⌊0.2·n + ½⌋`` (at least 1) of its n words by attribution (most positive first: towards the
  prediction) become ``[PAD]``, and the mean drop when as many words, drawn at random (seeded
  by the run's seed, the task and the example), do.

Each is given per task and ``overall`` (pooled over the tasks' examples).  The same seed gives
the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from p2pfed.model.data import make_activity_traces
from p2pfed.model.explain import explain
from p2pfed.model.faithfulness import masked_probabilities, word_positions
from p2pfed.model.m3t import TEXT, M3TModel, load_text_base, share_frozen
from p2pfed.model.questions import generate_questions
from p2pfed.model.tasks import TASKS
from p2pfed.model.train import LocalTrainer
from p2pfed.sim.education import EducationWorkload, _split_train_test

#: the share of a text's words deleted by ``text_top_vs_random``
TOKEN_SHARE = 0.2


def held_out_examples(edu: EducationWorkload, task: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` examples of ``task``'s held-out test set as
    :func:`~p2pfed.model.explain.explain` takes them: the texts as strings (rebuilt from the
    seed as the workload made them; the workload keeps only their encodings)."""
    data = edu.test[task]
    count = min(count, len(data))
    s, seed = edu.settings, edu.seed
    texts: list[str] | None = None
    labels = data.labels
    if task == "topic":
        questions = generate_questions(s.questions, seed)
        _, test = _split_train_test(len(questions), s.test_share, seed + 1)
        texts = [questions[int(i)][0] for i in test]
        labels = np.array([questions[int(i)][1] for i in test])
    elif task == "engagement":
        _, notes, alabels = make_activity_traces(s.traces, seed)
        _, test = _split_train_test(len(alabels), s.test_share, seed + 2)
        texts, labels = [notes[int(i)] for i in test], alabels[test]
    if not np.array_equal(labels, data.labels):
        raise AssertionError(f"{task}: the rebuilt test texts do not match the workload's")
    out = []
    for i in range(count):
        example: dict[str, Any] = {m: np.asarray(v[i]) for m, v in data.inputs.items()
                                   if m != TEXT}
        if texts is not None:
            example[TEXT] = texts[i]
        out.append(example)
    return out


def explainer(trainers: Mapping[str, LocalTrainer], task: str) -> str | None:
    """The node that explains ``task``: the first holder of its head in sorted name order."""
    return next((n for n in sorted(trainers) if task in trainers[n].model.tasks()), None)


def explain_report(edu: EducationWorkload, trainers: Mapping[str, LocalTrainer], count: int,
                   seed: int, provenance: Mapping[str, Any] | None) -> dict[str, Any]:
    """The report's ``explain`` section (``provenance``: the run's ``provenance`` section;
    ``provenance_spearman`` is left None, for a provenance study to fill)."""
    base: tuple[Any, Any] | None = None
    per_task: dict[str, dict[str, Any]] = {}
    pooled: dict[str, list[Any]] = {"beats": [], "ties": [], "top": [], "random": [],
                                    "explained": []}
    for k, task in enumerate(t.name for t in TASKS):
        node = explainer(trainers, task)
        if node is None:
            continue
        model = trainers[node].model
        spec = model.spec.task(task)
        if TEXT in spec.modalities and base is None:
            base = load_text_base(model.spec.text_model)
        with torch.random.fork_rng(devices=[]):  # (building seeds torch's generator)
            initial = M3TModel.build(model.spec, spec.pipeline(), init_seed=model.spec.lora_seed,
                                     text_base=None if base is None
                                     else (share_frozen(base[0]), base[1]))
        found = _task_checks(model, task, held_out_examples(edu, task, count), initial,
                             np.random.SeedSequence([seed, k]))
        for key in pooled:
            pooled[key] += found[key]
        per_task[task] = {"node": node, **_summary(found)}
    return {
        "examples": count,
        "token_share": TOKEN_SHARE,
        "nodes": {t: row["node"] for t, row in per_task.items()},
        "provenance_max_error": None if provenance is None
        else provenance.get("provenance_max_error"),
        "provenance_spearman": None,
        "faithfulness": {"overall": _summary(pooled), "per_task": per_task},
    }


def _task_checks(model: M3TModel, task: str, examples: list[dict[str, Any]],
                 initial: M3TModel, seeds: np.random.SeedSequence) -> dict[str, list[Any]]:
    """Per example of one task: whether deleting the top modality beat deleting the least (or
    a tie), and the drops for the top and a random share of the words."""
    spec = model.spec.task(task)
    found: dict[str, list[Any]] = {"beats": [], "ties": [], "top": [], "random": [],
                                   "shares": [], "explained": []}
    for example, child in zip(examples, seeds.spawn(len(examples)), strict=True):
        e = explain(model, task, example, initial=initial)
        found["explained"].append(1)
        found["shares"].append(e.modalities)

        def drop(modalities: tuple[str, ...] = (), tokens: tuple[int, ...] = (),
                 example: dict[str, Any] = example, e: Any = e) -> float:
            masked = masked_probabilities(model, task, example, modalities=modalities,
                                          tokens=tokens)
            return float(e.probability - masked[e.predicted])

        if len(spec.modalities) > 1:
            order = sorted(spec.modalities, key=lambda m: (e.modalities[m], m))
            least, top = order[0], order[-1]
            if e.modalities[top] > e.modalities[least]:
                found["beats"].append(drop((top,)) > drop((least,)))
            else:
                found["ties"].append(1)
        if TEXT in spec.modalities:
            words = word_positions(model, example[TEXT])
            if words:
                k = max(1, math.floor(TOKEN_SHARE * len(words) + 0.5))
                scores = e.inputs[TEXT]
                top_words = sorted(words, key=lambda i: (-scores[i], i))[:k]
                picked = np.random.default_rng(child).choice(words, size=k, replace=False)
                found["top"].append(drop(tokens=tuple(top_words)))
                found["random"].append(drop(tokens=tuple(int(i) for i in picked)))
    return found


def _summary(found: Mapping[str, list[Any]]) -> dict[str, Any]:
    beats, top, rand = found["beats"], found["top"], found["random"]
    out: dict[str, Any] = {}
    out["examples"] = len(found["explained"])
    if "shares" in found:
        shares = found["shares"]
        out["mean_modality_shares"] = {m: float(np.mean([s[m] for s in shares]))
                                       for m in (shares[0] if shares else {})}
    out.update({
        "multi_modal_examples": len(beats),
        "modality_ties": len(found["ties"]),
        "modality_top_beats_least": float(np.mean(beats)) if beats else None,
        "text_examples": len(top),
        "text_top_vs_random": {"top": float(np.mean(top)), "random": float(np.mean(rand))}
        if top else None,
    })
    return out
