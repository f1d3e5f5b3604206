"""Forecasters behind one interface (:class:`tsssm.models.base.Forecaster`).

Model classes import lazily: the Kalman model pulls in only the Kalman library, the Mamba
model only the selective scan.
"""

from tsssm.models.base import Forecaster, Gaussian

__all__ = ["Forecaster", "Gaussian"]
