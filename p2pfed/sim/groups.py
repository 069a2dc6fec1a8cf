"""The group study's attribute on the education workload (``simulate --groups``).

Every example gets a group: ``majority`` (0) or ``minority`` (1), the learners who reach the
school through a phone and write in a texting style.  Their data differs by modality, always
the same way (seeded, documented here, so the study is the same on every machine):

* **text** (questions and notes): every word of four letters or more loses its vowels after
  the first letter (``"quadratic equations"`` → ``"qdrtc eqtns"``);
* **images** (digits): scanned by a phone: shifted one pixel down and right, contrast × 0.6;
* **activity traces**: short sessions on a phone: hours on task × 0.5, forum posts × 0.25,
  logins × 1.5 (the same engagement reads differently).

Under-represented and concentrated: the minority is ``RICH_RATE`` (half) of the examples of
the nodes of one region and ``OTHER_RATE`` (5 %) elsewhere.  A region is one institution with
everyone under it in a hierarchical topology (the one drawn by the seed), else a quarter of the
nodes (drawn by the seed).  On ``hierarchical-edu`` that makes the minority about a fifth of
each task's training examples.  The test set is half and half (``TEST_RATE``), so each group's
accuracy is measured on as many examples; the mean weighs the groups by their training shares.
"""

from __future__ import annotations

import math
import re

import numpy as np

from p2pfed.sim.topology import Topology

GROUPS = {0: "majority", 1: "minority"}
MINORITY = 1
RICH_RATE = 0.5
OTHER_RATE = 0.05
TEST_RATE = 0.5

_WORD = re.compile(r"[A-Za-z]{4,}")


def region(topo: Topology, seed: int) -> frozenset[str]:
    """The nodes where the minority is common: one institution and the nodes under it
    (hierarchical names carry their parent's suffix), else a quarter of the nodes."""
    rng = np.random.default_rng([seed, 4099])
    top = [n for n in topo.nodes if topo.groups.get(n) and n.count("-") == 1]
    if top:
        root = top[int(rng.integers(len(top)))]
        suffix = root[root.index("-"):]
        return frozenset(n for n in topo.nodes if n[n.index("-"):].startswith(suffix)
                         and (n == root or n[n.index("-"):][len(suffix)] == "-"))
    count = max(1, math.ceil(len(topo.nodes) / 4))
    return frozenset(rng.choice(list(topo.nodes), size=count, replace=False).tolist())


def draw(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Groups of ``n`` examples: the minority with probability ``rate``."""
    return (rng.random(n) < rate).astype(np.int64) * MINORITY


def shift_text(text: str) -> str:
    """The minority's texting style: long words keep their first letter and consonants."""
    return _WORD.sub(lambda m: m.group(0)[0] + re.sub(r"[aeiouAEIOU]", "", m.group(0)[1:]),
                     text)


def shift_images(images: np.ndarray) -> np.ndarray:
    """Phone scans: one pixel down and right (the freed row and column blank), contrast × 0.6."""
    out = np.zeros_like(images)
    out[..., 1:, 1:] = images[..., :-1, :-1]
    return (out * 0.6).astype(images.dtype)


def shift_activity(traces: np.ndarray) -> np.ndarray:
    """Phone sessions: logins × 1.5, hours on task × 0.5, forum posts × 0.25 (features 0, 1,
    3 of :func:`p2pfed.model.data.make_activity_traces`)."""
    out = traces.copy()
    out[..., 0] *= 1.5
    out[..., 1] *= 0.5
    out[..., 3] *= 0.25
    return out
