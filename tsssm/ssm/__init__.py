"""Selective state space scans: the specification, the torch path and the Triton kernels.

``selective_scan`` (whole sequences or chunks with the state carried) and
``selective_state_update`` (one timestep, for streaming) share mamba-ssm's semantics; see
:mod:`tsssm.ssm.scan_ref` for the definition. Importing this package does not import Triton.
"""

from __future__ import annotations

from tsssm.ssm.scan import BACKENDS, selective_scan
from tsssm.ssm.scan_ref import selective_scan_ref, selective_state_update_ref
from tsssm.ssm.step import selective_state_update

__all__ = [
    "BACKENDS",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
