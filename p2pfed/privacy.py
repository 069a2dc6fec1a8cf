"""Differential-privacy accounting: the ε a Gaussian mechanism spends, for planning budgets.

The accountant is opacus' Rényi-DP accountant (the subsampled Gaussian mechanism, Mironov et
al. 2019); p2pfed does not carry its own copy of that analysis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gossip.errors import ConfigError


@dataclass(frozen=True)
class Spent:
    epsilon: float
    delta: float
    best_order: float  # the Rényi order that gave the tightest ε


@functools.lru_cache(maxsize=4096)
def epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> Spent:
    """ε after ``steps`` releases with noise multiplier ``sigma`` and sampling rate ``q``.

    Cached: a node asks for the same count when it checks its budget before training and
    again when it records the release.
    """
    if not sigma > 0:
        raise ConfigError("the noise multiplier sigma must be > 0")
    if not 0 < sample_rate <= 1:
        raise ConfigError("the sample rate must be in (0, 1]")
    if steps < 0:
        raise ConfigError("steps must be >= 0")
    if not 0 < delta < 1:
        raise ConfigError("delta must be in (0, 1)")
    if steps == 0:
        return Spent(0.0, delta, float("nan"))
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    eps, order = accountant.get_privacy_spent(delta=delta)
    return Spent(float(eps), delta, float(order))


@dataclass(frozen=True)
class Policy:
    """Differential privacy for one component: each released update is clipped to ``clip`` and
    gets Gaussian noise of standard deviation ``sigma * clip``; the releases are accounted with
    the RDP accountant at ``sample_rate`` (1: the whole local dataset takes part every round,
    no amplification by subsampling) and ``delta``.  ``budget`` caps ε (0: no cap)."""

    clip: float
    sigma: float
    delta: float = 1e-5
    sample_rate: float = 1.0
    budget: float = 0.0

    def __post_init__(self) -> None:
        if not self.clip > 0 or not self.sigma > 0:
            raise ConfigError("privacy clip and sigma must be > 0")
        if not 0 < self.delta < 1 or not 0 < self.sample_rate <= 1 or self.budget < 0:
            raise ConfigError("privacy delta must be in (0, 1), sample_rate in (0, 1], "
                              "budget >= 0")

    @property
    def noise_std(self) -> float:
        return self.sigma * self.clip

    def spent(self, releases: int) -> float:
        """ε after ``releases`` updates."""
        return epsilon(self.sigma, self.sample_rate, releases, self.delta).epsilon

    def allows(self, releases: int) -> bool:
        """May one more update be released after ``releases``?"""
        return not self.budget or self.spent(releases + 1) <= self.budget


def privatize(origin: torch.Tensor, trained: torch.Tensor, policy: Policy,
              generator: torch.Generator) -> float:
    """Clip ``trained - origin`` to the policy's norm and add its noise, in ``trained``.

    Returns the update's norm before clipping.
    """
    step = trained.to(torch.float64) - origin.to(torch.float64)
    norm = float(torch.linalg.vector_norm(step))
    if norm > policy.clip:
        step *= policy.clip / norm
    noise = torch.randn(step.shape, generator=generator, dtype=torch.float64)
    trained.copy_(origin.to(torch.float64) + step + noise * policy.noise_std)
    return norm
