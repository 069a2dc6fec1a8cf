"""A component's privacy account: what its released updates have spent, and the release.

One :class:`PrivacyAccount` per trained component with a policy
(``NodeConfig.privacy``).  Each local update is clipped and noised before it is announced
(:func:`p2pfed.privacy.privatize`), counted (the ε spent is the accountant's, for that many
releases), and once the budget allows no further release the component is only mixed.  The
count goes to the ledger with the update, before the send, and a restart reads it back: a
release is never given back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from p2pfed.journal import PrivacySpent
from p2pfed.privacy import Policy, privatize

log = logging.getLogger(__name__)


class Noise:
    """The node's one noise generator, shared by its components in the order they release
    (seeded: ``NodeConfig.noise_seed``; made on first use)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator


class PrivacyAccount:
    """The releases of one component under ``policy``."""

    def __init__(self, name: str, policy: Policy, noise: Noise) -> None:
        self.name = name
        self.policy = policy
        self._noise = noise
        self.releases = 0  # differentially private updates released so far
        self.exhausted = False  # the budget allows no more releases
        self.released = False  # the update being published is a release

    def may_release(self, who: str) -> bool:
        """May the component train (and release) once more?  Says so, once, when it may not."""
        if self.policy.allows(self.releases):
            return True
        if not self.exhausted:
            log.warning("%s: the privacy budget of %s is spent (ε %.3g after %d updates); it is "
                        "no longer trained, only mixed", who, self.name,
                        self.policy.spent(self.releases), self.releases)
        self.exhausted = True
        return False

    def release(self, origin: torch.Tensor, trained: torch.Tensor) -> None:
        """Clip ``trained - origin`` and add the noise, in ``trained``; count the release."""
        privatize(origin, trained, self.policy, self._noise.generator())
        self.released = True
        self.releases += 1

    def published(self) -> tuple[PrivacySpent, float]:
        """The update is announced: what the ledger records of it, and the noise std its
        announcement declares (0 for a round that only mixed)."""
        p = self.policy
        spent = PrivacySpent(self.releases, p.spent(self.releases), p.delta, p.sigma, p.clip,
                             self.released)
        noise = p.noise_std if self.released else 0.0
        self.released = False
        return spent, noise

    def restored(self, releases: int) -> None:
        """The releases a ledger counts (never fewer than this account knows of)."""
        self.releases = max(self.releases, releases)

    def status(self) -> dict[str, Any]:
        p = self.policy
        return {"epsilon_spent": p.spent(self.releases), "delta": p.delta,
                "noise_multiplier": p.sigma, "clip": p.clip, "releases": self.releases,
                "budget": p.budget or None, "exhausted": self.exhausted}
