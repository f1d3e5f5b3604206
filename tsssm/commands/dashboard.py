"""`tsssm dashboard`: the Dash app of ``dashboards/`` over the configured tracking store."""

from __future__ import annotations

import logging
import socket

from omegaconf import DictConfig

from tsssm.errors import ConfigError
from tsssm.tracking import RunStore

DEFAULT_PORT = 8050


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # as the server will: a port closed a moment ago (TIME_WAIT) can be reused
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                              "choose another port with --port N") from err


def dashboard(cfg: DictConfig, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
              verbose: bool = False) -> None:
    """Serve the dashboard until Ctrl-C."""
    from dashboards import create_app
    from dashboards.data import default_benchmarks_dir

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: choose a port between 1 and 65535")
    _check_port(host, port)
    store = RunStore(cfg.tracking.uri)
    app = create_app(store, default_benchmarks_dir())
    if not verbose:  # no line per request, and no second "Dash is running on" line
        for name in ("werkzeug", "dash", "dash.dash"):
            logging.getLogger(name).setLevel(logging.WARNING)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"tsssm dashboard over {store.uri}\n  open http://{shown}:{port}/ in a browser "
          "(Ctrl-C stops it)", flush=True)
    try:
        app.run(host=host, port=port, debug=False)
    finally:
        store.close()
