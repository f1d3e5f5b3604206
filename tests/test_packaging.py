"""What `pip install -e .` pulls: Triton (a 286 MB wheel, CUDA kernels only) is not a core
dependency but the `gpu` extra, and the `test` extra keeps it for the interpreter tests."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PROJECT = tomllib.loads(
    (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for r in requirements}


def test_triton_is_only_in_the_gpu_and_test_extras():
    assert "triton" not in _names(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert "triton" in _names(extras["gpu"]) and "triton" in _names(extras["test"])
