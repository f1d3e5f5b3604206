"""Simulated streams with a known answer, for examples and tests.

:func:`spring_frame`: a damped mass-spring-damper ``ẍ = -(k/m) x - (b/m) ẋ + g u + noise``
driven by a piecewise-constant setpoint ``u``, observed with noise at irregular times (steps
drawn from ``steps``). The simulation is exact at the sample times (the continuous model is
discretised for every step, :func:`tsssm.kalman.ct.ct_sample`), so a continuous-time model of
the right form should recover ``k/m`` and ``b/m``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from tsssm.kalman.ct import ct_sample, steps_from_times
from tsssm.kalman.ct_models import CTStructuralModel


def spring_frame(n_rows: int = 1500, *, k_over_m: float = 0.4, b_over_m: float = 0.15,
                 gain: float = 0.5, force_sd: float = 0.15, obs_sd: float = 0.05,
                 steps: Sequence[float] = (0.5, 1.0, 2.0), hold_rows: int = 40,
                 seed: int = 0, start: str = "2024-01-01") -> pl.DataFrame:
    """Columns ``timestamp`` (datetime, irregular), ``x`` (the observed position) and ``u``
    (the setpoint). The setpoint jumps every ``hold_rows`` rows to a standard normal value."""
    rng = np.random.default_rng(seed)
    dt = rng.choice(np.asarray(steps, dtype=np.float64), size=n_rows)
    times = np.concatenate([[0.0], np.cumsum(dt[1:])])
    levels = rng.normal(size=n_rows // hold_rows + 1)
    u = np.repeat(levels, hold_rows)[:n_rows, None]
    model = CTStructuralModel(("oscillator",), n_inputs=1)
    theta = torch.tensor([math.log(k_over_m), math.log(b_over_m), 2 * math.log(force_sd), gain,
                          2 * math.log(obs_sd)], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    _, y = ct_sample(model.to_ct(theta), steps_from_times(torch.from_numpy(times)),
                     torch.from_numpy(u), generator=generator)
    stamps = np.datetime64(start, "ns") + np.round(times * 1e9).astype("timedelta64[ns]")
    return pl.DataFrame({"timestamp": stamps, "x": y[:, 0].numpy(), "u": u[:, 0]})
