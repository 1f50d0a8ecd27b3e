"""How many held-out normal images a threshold needs: the rule export enforces and train warns about early.

The highest of n normal scores is exceeded by about 1 new normal part in n + 1, so n held-out images cannot set a
threshold for a false-alarm rate much below 1/(n + 1). Export refuses (unless forced) when that floor is over
``COARSE_FACTOR`` times the target rate; train says so at its start, before an hour of training ends in a refusal.
"""

from __future__ import annotations

import math

COARSE_FACTOR = 10.0
DEFAULT_FALSE_ALARM_RATE = 0.005


def resolvable_rate(n_held: int) -> float:
    """The lowest false-alarm rate ``n_held`` held-out normal images can vouch for: 1/(n + 1)."""
    return 1.0 / (n_held + 1)


def too_few(n_held: int, false_alarm_rate: float) -> bool:
    """Whether ``n_held`` images are too few for ``false_alarm_rate`` (module docstring)."""
    return resolvable_rate(n_held) > COARSE_FACTOR * false_alarm_rate


def images_needed(false_alarm_rate: float, val_fraction: float) -> int:
    """Images train/good needs so that its held-out ``val_fraction`` is not ``too_few`` for ``false_alarm_rate``."""
    return math.ceil((1.0 / (COARSE_FACTOR * false_alarm_rate) - 1.0) / val_fraction)
