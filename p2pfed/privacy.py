"""Differential-privacy accounting: the ε a Gaussian mechanism spends, for planning budgets.

The accountant is opacus' Rényi-DP accountant (the subsampled Gaussian mechanism, Mironov et
al. 2019); p2pfed does not carry its own copy of that analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

from gossip.errors import ConfigError


@dataclass(frozen=True)
class Spent:
    epsilon: float
    delta: float
    best_order: float  # the Rényi order that gave the tightest ε


def epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> Spent:
    """ε after ``steps`` releases with noise multiplier ``sigma`` and sampling rate ``q``."""
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
