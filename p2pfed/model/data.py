"""Local data for the M3T tasks: built-in sample data and non-IID splits.

Input keys are modality names (``"text"``, ``"image"``, ``"activity"``), as in
:mod:`p2pfed.model.m3t`.

Built-in data, all generated or bundled (nothing is downloaded):

* :func:`load_digits_images` — scikit-learn's bundled 8×8 digits.
* :func:`make_activity_traces` — synthetic student activity traces with a free-text note; the
  label needs both modalities (see the function's docstring).
* :func:`p2pfed.model.questions.generate_questions` — topic-tagged curriculum questions.

The dataset record and the loaders of an institution's files are in :mod:`p2pfed.model.loaders`;
they are importable from here too.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from gossip.errors import ConfigError, LocalError
from p2pfed.config import SOURCE_KINDS
from p2pfed.model.loaders import (
    Dataset,
    InputArray,
    load_csv_series,
    load_image_array,
    load_jsonl_text,
    load_source,
)

__all__ = [
    "ACTIVITY_CLASSES", "ACTIVITY_FEATURES", "ACTIVITY_STEPS", "MODALITY_FILES", "SOURCE_KINDS",
    "Dataset", "InputArray", "dirichlet_split", "load_csv_series", "load_digits_images",
    "load_image_array", "load_jsonl_text", "load_source", "make_activity_traces",
]

ACTIVITY_STEPS = 24
ACTIVITY_FEATURES: tuple[str, ...] = ("logins", "hours_on_task", "submissions", "forum_posts")
ACTIVITY_CLASSES: tuple[str, ...] = ("engaged", "at-risk", "burnout")
#: the file each modality is read from: its ``[data.<task>.<modality>] kind`` and file suffix
MODALITY_FILES: dict[str, tuple[str, str]] = {
    "text": ("text-jsonl", ".jsonl"),
    "image": ("image-npz", ".npz"),
    "activity": ("series-csv", ".csv"),
}


# ---------------------------------------------------------------------------------------------
# Built-in data


def load_digits_images() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """scikit-learn's bundled digits: images ``(1797, 1, 8, 8)`` in ``[0, 1]`` and labels 0-9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images.reshape(-1, 1, 8, 8), labels


_CONCERN_ACADEMIC: tuple[str, ...] = (
    "asked for help with the last problem set",
    "grades are slipping on the weekly quizzes",
    "finds the new material confusing",
    "scored low on the midterm",
    "needs extra practice with the basics",
    "did not understand the feedback on the essay",
    "struggles to follow the lab instructions",
    "mixed up the formulas in class",
)
_CONCERN_WELLBEING: tuple[str, ...] = (
    "seems tired in class",
    "mentions working late nights",
    "says they feel overwhelmed",
    "stopped enjoying the group project",
    "looks exhausted during labs",
    "talks about too much pressure at home",
    "has trouble sleeping before exams",
    "feels stretched thin by a part-time job",
)
_NEUTRAL: tuple[str, ...] = (
    "attends most lectures",
    "submitted the last assignment",
    "sits near the front",
    "prefers working alone",
    "joined a study group",
    "uses the library often",
    "is usually quiet in discussions",
    "replied to the tutor's email",
)


def make_activity_traces(
    n: int, seed: int
) -> tuple[npt.NDArray[np.float32], list[str], npt.NDArray[np.int64]]:
    """Synthetic student activity: traces ``(n, 24, 4)``, one note per student, labels 0/1/2.

    Labels are 0 engaged, 1 at-risk, 2 burnout, balanced (``n // 3`` each, the first
    ``n % 3`` classes one more) and shuffled.  One ``numpy.random.default_rng(seed)`` drives, in
    order: the label shuffle, then the traces (vectorised over students), then the notes.

    **Traces.**  Each of the 24 steps (half-weeks of a 12-week term) comes from a latent
    engagement level ``e_t`` in ``[0, 1]``:

    * engaged: ``e_t = b + w_t`` with base ``b ~ U(0.6, 0.95)``;
    * at-risk and burnout (the *same* process): ``e_t = b - d·t/23 + w_t`` with
      ``b ~ U(0.55, 0.9)`` and decline ``d ~ U(0.35, 0.7)``;

    where ``w_t`` is an AR(1) noise (``w_t = 0.7·w_{t-1} + N(0, 0.06)``), then clipped.  The four
    features are ``logins ~ Poisson(3e)``, ``hours_on_task = max(0, 1.5e + N(0, 0.3))``,
    ``submissions ~ Binomial(1, e)`` and ``forum_posts ~ Poisson(1.2e)``.  Traces separate engaged
    from the others but say nothing about at-risk versus burnout.

    **Notes.**  A note is one *concern* phrase and one *neutral* phrase, in random order, joined
    by ``"; "``.  At-risk students' concern comes from the academic pool (90%) or the wellbeing
    pool (10%), burnout students' the other way round, and engaged students' from either pool
    with equal odds.  Notes separate at-risk from burnout but not engaged from the others.
    """
    if n < 0:
        raise LocalError(f"n must be >= 0, got {n}")
    k = len(ACTIVITY_CLASSES)
    labels = np.array([c for c in range(k) for _ in range(n // k)] + list(range(n % k)))
    rng = np.random.default_rng(seed)
    rng.shuffle(labels)
    labels = labels.astype(np.int64)
    traces = _activity_series(labels, rng)
    notes = [_activity_note(label, rng) for label in labels.tolist()]
    return traces, notes, labels


def _activity_series(labels: npt.NDArray[np.int64], rng: np.random.Generator,
                     ) -> npt.NDArray[np.float32]:
    """The traces of :func:`make_activity_traces`, vectorised over students (its draws 2–8)."""
    n, steps = len(labels), ACTIVITY_STEPS
    engaged = labels == 0
    base = np.where(engaged, rng.uniform(0.6, 0.95, n), rng.uniform(0.55, 0.9, n))
    decline = np.where(engaged, 0.0, rng.uniform(0.35, 0.7, n))
    shocks = rng.normal(0.0, 0.06, (n, steps))
    noise = np.zeros((n, steps))
    for t in range(steps):
        noise[:, t] = shocks[:, t] + (0.7 * noise[:, t - 1] if t else 0.0)
    time = np.arange(steps) / (steps - 1)
    level = np.clip(base[:, None] - decline[:, None] * time[None, :] + noise, 0.0, 1.0)
    logins = rng.poisson(3.0 * level)
    hours = np.maximum(0.0, 1.5 * level + rng.normal(0.0, 0.3, (n, steps)))
    submissions = rng.binomial(1, level)
    posts = rng.poisson(1.2 * level)
    return np.stack([logins, hours, submissions, posts], axis=-1).astype(np.float32)


def _activity_note(label: int, rng: np.random.Generator) -> str:
    """One student's note of :func:`make_activity_traces` (four draws, in this order)."""
    r = rng.random()
    if label == 0:
        academic = r < 0.5
    elif label == 1:
        academic = r < 0.9
    else:
        academic = r >= 0.9
    pool = _CONCERN_ACADEMIC if academic else _CONCERN_WELLBEING
    concern = pool[int(rng.integers(len(pool)))]
    neutral = _NEUTRAL[int(rng.integers(len(_NEUTRAL)))]
    parts = [concern, neutral] if rng.random() < 0.5 else [neutral, concern]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Non-IID split


def dirichlet_split(
    labels: npt.ArrayLike, n_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[npt.NDArray[np.int64]]:
    """Partition sample indices among ``n_clients`` with Dirichlet(``alpha``) label skew.

    For each class (in sorted order) the class's indices are shuffled and cut in proportions
    drawn from ``Dirichlet(alpha, ..., alpha)``.  Small ``alpha`` gives each client few classes;
    large ``alpha`` approaches an IID split.  If a client ends up with fewer than ``min_size``
    samples the whole draw is repeated (same generator, up to 20 times); if that still fails,
    samples are moved one at a time from the largest client (its highest index) to the smallest
    (lowest client number on ties).  Deterministic for ``seed``; every index is used exactly
    once; each returned array is sorted.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError("labels must be a 1-D array")
    if n_clients < 1:
        raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0 or n_clients * min_size > y.shape[0]:
        raise ConfigError(
            f"cannot give {n_clients} clients at least {min_size} samples each "
            f"from {y.shape[0]} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(20):
        parts = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:
                p = np.zeros(n_clients)
                p[int(rng.integers(n_clients))] = 1.0
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p_) for p_ in parts) >= min_size:
            break
    else:
        for part in parts:
            part.sort()
        while True:
            sizes = [len(p_) for p_ in parts]
            small = int(np.argmin(sizes))
            if sizes[small] >= min_size:
                break
            big = int(np.argmax(sizes))
            parts[small].append(parts[big].pop())
            parts[big].sort()
    return [np.array(sorted(p_), dtype=np.int64) for p_ in parts]
