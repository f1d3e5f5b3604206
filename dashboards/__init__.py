"""The tsssm dashboard (Dash) over an MLflow tracking store: ``tsssm dashboard``."""

from dashboards.app import create_app

__all__ = ["create_app"]
