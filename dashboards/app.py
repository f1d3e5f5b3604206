"""The tsssm dashboard: a Dash app over an MLflow tracking store.

Pages: ``/`` the runs table (filter, sort, pick runs to compare), ``/run/<id>`` one run
(metrics, forecast vs actual with its ±2σ band, the anomaly score with a threshold slider that
recomputes precision, recall, F1, FAR and MAR, per-channel attribution of a flagged interval
where the scores have ``contrib:<channel>`` columns), ``/compare?runs=a,b`` several runs in one
table and overlaid charts, ``/benchmarks`` the tables of ``benchmarks/results/*.json``.

Runs are read through ``tsssm.tracking.RunStore`` and drawn by ``tsssm.plots``; long streams
are decimated for display and re-queried at every zoom, so the full data is a zoom away.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import dash
import numpy as np
from dash import Input, Output, State, dash_table, dcc, html

from dashboards import data as D
from tsssm import plots
from tsssm.errors import TsssmError
from tsssm.tracking import RunRecord, RunStore

STATUS_COLORS = {"FINISHED": "#15803d", "FAILED": "#b91c1c", "RUNNING": "#b45309",
                 "KILLED": "#6b7280", "SCHEDULED": "#6b7280"}
PAGE_STYLE = {"fontFamily": "system-ui, sans-serif", "margin": "0 24px 40px", "color": "#1f2937"}
TABLE_STYLE = dict(style_table={"overflowX": "auto"},
                   style_cell={"fontFamily": "system-ui, sans-serif", "fontSize": 13,
                               "padding": "4px 8px", "textAlign": "left"},
                   style_header={"fontWeight": "600", "backgroundColor": "#f3f4f6"})


def _status_styles(column: str = "status") -> list[dict]:
    return [{"if": {"filter_query": f"{{{column}}} = {s}", "column_id": column},
             "color": c, "fontWeight": "600"} for s, c in STATUS_COLORS.items()]


def badge(status: str, element_id: str | None = None) -> html.Span:
    kw = {"id": element_id} if element_id else {}
    return html.Span(status, className=f"status status-{status}", **kw, style={
        "background": STATUS_COLORS.get(status, "#6b7280"), "color": "white",
        "borderRadius": "4px", "padding": "2px 8px", "fontSize": 13, "fontWeight": 600})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _cell(v: Any) -> Any:
    """A table cell: floats to 4 decimals, NaN empty."""
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else None
    return v


def _table(table_id: str, rows: list[dict], columns: list[str], **kw) -> dash_table.DataTable:
    cols = [{"name": c, "id": c, **({"type": "numeric"} if any(
        isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool) for r in rows)
        else {})} for c in columns]
    return dash_table.DataTable(id=table_id, data=rows, columns=cols, **TABLE_STYLE, **kw)


def _parse_window(relayout: dict | None, is_date: bool) -> Any:
    """The x range of a relayout event: (lo, hi), None for 'autorange' (the whole stream),
    or dash.no_update for events that do not move the x axis."""
    if not relayout:
        return dash.no_update
    lo = hi = None
    for key, value in relayout.items():
        m = re.fullmatch(r"xaxis\d*\.(range\[0\]|range\[1\]|range|autorange)", key)
        if not m:
            continue
        part = m.group(1)
        if part == "autorange":
            return None
        if part == "range":
            lo, hi = value
        elif part == "range[0]":
            lo = value
        else:
            hi = value
    if lo is None or hi is None:
        return dash.no_update
    if is_date:
        return [str(lo).replace(" ", "T"), str(hi).replace(" ", "T")]
    return [float(lo), float(hi)]


def _window(stored: list | None, time: np.ndarray) -> tuple | None:
    if not stored:
        return None
    if np.issubdtype(time.dtype, np.datetime64):
        return (np.datetime64(stored[0], "ns"), np.datetime64(stored[1], "ns"))
    return (float(stored[0]), float(stored[1]))


def create_app(store: RunStore, benchmarks_dir: Path | None = None) -> dash.Dash:
    """The dashboard over ``store``; ``benchmarks_dir`` holds benchmark results (JSON)."""
    cache = D.FrameCache(store)
    app = dash.Dash(__name__, title="tsssm dashboard", suppress_callback_exceptions=True,
                    update_title=None)
    app.layout = html.Div(style=PAGE_STYLE, children=[
        dcc.Location(id="url"),
        html.Header(style={"display": "flex", "gap": "20px", "alignItems": "baseline",
                           "borderBottom": "1px solid #e5e7eb", "padding": "12px 0"}, children=[
            html.Strong("tsssm", style={"fontSize": 20}),
            dcc.Link("Runs", href="/", id="nav-runs"),
            dcc.Link("Compare", href="/compare", id="nav-compare"),
            dcc.Link("Benchmarks", href="/benchmarks", id="nav-benchmarks"),
            html.Span(f"store: {store.uri}", style={"color": "#6b7280", "fontSize": 12,
                                                    "marginLeft": "auto"}),
        ]),
        # the spinner while a page is built; each graph fills in on its own afterwards
        dcc.Loading(html.Div(id="page"), type="circle", delay_show=400,
                    target_components={"page": "children"}),
    ])

    # -- pages -----------------------------------------------------------------------------
    def runs_page() -> html.Div:
        runs = store.runs()
        if not runs:
            return html.Div(id="empty-store", children=[
                html.H2("No runs yet"),
                html.P(f"The tracking store {store.uri} has no runs."),
                html.P(["Make one from the folder you started the dashboard in, e.g. ",
                        html.Code("tsssm run"), " (train, score and compare on the bundled "
                        "sample) or ", html.Code("tsssm train"), ", then reload this page."]),
            ])
        rows = D.runs_rows(runs)
        columns = ["run", "experiment", "command", "dataset", "model", "task", "status",
                   *[k for k in D.HEADLINE if any(r[k] is not None for r in rows)],
                   "started", "duration"]
        cols = [{"name": c, "id": c, "presentation": "markdown"} if c == "run" else
                {"name": c, "id": c, "type": "numeric" if c in D.HEADLINE else "text"}
                for c in columns]
        table = dash_table.DataTable(
            id="runs-table", data=rows, columns=cols, filter_action="native",
            sort_action="native", sort_mode="multi", row_selectable="multi",
            page_size=50, markdown_options={"link_target": "_self"},
            style_data_conditional=_status_styles(), **TABLE_STYLE)
        counts = {s: sum(r.status == s for r in runs) for s in STATUS_COLORS}
        summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
        return html.Div([
            html.H2(f"Runs ({len(runs)}: {summary})"),
            html.P("Filter with the boxes under the headers (e.g. kalman, FAILED, >0.5); "
                   "sort by a header; tick runs to compare them.",
                   style={"color": "#6b7280"}),
            html.Div(dcc.Link("Compare the selected runs", href="/compare", id="compare-link"),
                     style={"margin": "8px 0"}),
            table,
        ])

    def run_page(run_id: str) -> html.Div:
        try:
            run = store.run(run_id)
        except TsssmError as err:
            return html.Div(id="run-missing", children=[html.H2("No such run"), html.P(str(err))])
        meta = [f"{k}: {v}" for k, v in (
            ("command", run.command), ("model", run.tags.get("tsssm.model")),
            ("dataset", run.tags.get("tsssm.data")), ("experiment", run.experiment),
            ("started", D.when(run.start_time)), ("duration", D.duration(run)),
            ("run id", run.run_id)) if v]
        parts: list[Any] = [
            dcc.Store(id="run-id", data=run.run_id),
            html.H2([run.name, " ", badge(run.status, "run-status")]),
            html.P(" · ".join(meta), style={"color": "#4b5563"}),
        ]
        if run.status == "FAILED":
            parts.append(html.Div(id="run-error", style={
                "background": "#fef2f2", "border": "1px solid #fecaca", "padding": "8px 12px",
                "color": "#991b1b", "whiteSpace": "pre-wrap"},
                children=["This run FAILED: ", run.tags.get("tsssm.error", "no error recorded")]))
        elif run.status == "RUNNING":
            parts.append(html.P("This run is still RUNNING: reload for its newest results.",
                                id="run-running", style={"color": "#b45309"}))
        if run.metrics:
            rows = [{"metric": k, "value": _fmt(v)} for k, v in sorted(run.metrics.items())]
            parts += [html.H3("Metrics"), _table("run-metrics", rows, ["metric", "value"],
                                                 page_size=15, filter_action="native")]
        parts += _scores_section(run)
        parts += _forecast_section(run)
        parts += _compare_section(run)
        parts += _history_section(run)
        return html.Div(parts)

    def _scores_section(run: RunRecord) -> list:
        scores = cache.frame(run, D.SCORES)
        if scores is None or scores.height == 0:
            return []
        source = None
        src = run.tags.get("tsssm.source_run")
        if src and re.fullmatch(r"[0-9a-f]{32}", src):
            try:
                source = store.run(src)
            except TsssmError:
                source = None
        fitted = D.fitted_threshold(run, scores, source)
        evaluated = D.evaluated_rows(scores)
        grid = D.threshold_grid(evaluated["score"].to_numpy(), fitted)
        start = int(np.argmin([abs(g - fitted) for g in grid])) if fitted is not None else 0
        marks = {int(i): f"{grid[i]:.3g}" for i in np.linspace(0, len(grid) - 1, 6).astype(int)}
        streams = D.stream_names(scores)
        has_split = "split" in scores.columns
        has_contrib = bool(D.contrib_channels(scores))
        section = [
            html.H3("Anomaly score"),
            dcc.Store(id="threshold-grid", data=grid),
            dcc.Store(id="fitted-threshold", data=fitted),
            dcc.Store(id="anomaly-window"),
            html.Div(style={"display": "flex", "gap": "16px", "alignItems": "center"}, children=[
                html.Label("stream"),
                dcc.Dropdown(streams, streams[0], id="score-stream", clearable=False,
                             style={"width": "320px"}),
                html.Label("rows"),
                dcc.RadioItems(["test", "all"] if has_split else ["all"],
                               "test" if has_split else "all", id="score-split", inline=True),
            ]),
            html.Div(style={"margin": "12px 0"}, children=[
                html.Div(id="threshold-value"),
                dcc.Slider(0, len(grid) - 1, 1, value=start, marks=marks, id="threshold-slider",
                           updatemode="drag", included=False, allow_direct_input=False),
            ]),
            html.Div(id="live-metrics"),
            dcc.Graph(id="anomaly-graph", config={"displaylogo": False}),
        ]
        if has_contrib:
            section += [
                html.H3("Per-channel attribution of a flagged interval"),
                dcc.Dropdown(id="interval", clearable=False, style={"width": "640px"}),
                dcc.Graph(id="attribution-graph", config={"displaylogo": False}),
            ]
        return section

    def _forecast_section(run: RunRecord) -> list:
        forecasts = cache.frame(run, D.FORECASTS)
        if forecasts is None or forecasts.height == 0:
            return []
        streams = D.stream_names(forecasts)
        channels = D.forecast_channels(forecasts)
        return [
            html.H3("One-step forecast vs actual (test split, ±2σ band)"),
            dcc.Store(id="forecast-window"),
            html.Div(style={"display": "flex", "gap": "16px", "alignItems": "center"}, children=[
                html.Label("stream"),
                dcc.Dropdown(streams, streams[0], id="fc-stream", clearable=False,
                             style={"width": "320px"}),
                html.Label("channels"),
                dcc.Dropdown(channels, channels[:4], id="fc-channels", multi=True,
                             style={"minWidth": "420px"}),
            ]),
            dcc.Graph(id="forecast-graph", config={"displaylogo": False}),
        ]

    def _compare_section(run: RunRecord) -> list:
        if run.command != "compare":
            return []
        rows = D.comparison_rows([run], cache)
        if not rows:
            return []
        return [html.H3("Comparison table"), *_comparison_block(rows, "run-compare")]

    def _history_section(run: RunRecord) -> list:
        key = next((k for k in ("train/loss", "train/loglik") if k in run.metrics), None)
        if key is None:
            return []
        history = store.metric_history(run.run_id, key)
        if len(history) < 2:
            return []
        steps = np.array([s for s, _ in history], np.float64)
        values = np.array([v for _, v in history], np.float64)
        fig = plots.overlay_figure([(key, steps, values)], f"{key} per step", y_title=key)
        fig.update_xaxes(title="step")
        return [html.H3("Training"), dcc.Graph(id="history-graph", figure=fig)]

    def _comparison_block(rows: list[dict], prefix: str) -> list:
        metrics = D.metric_columns(rows)
        columns = ["method", *[c for c in ("kind", "status") if any(c in r for r in rows)],
                   *metrics]
        shown = [{c: _cell(r.get(c)) for c in columns} for r in rows]
        out: list[Any] = [_table(f"{prefix}-table", shown, columns, sort_action="native",
                                 style_data_conditional=_status_styles())]
        wanted = [m for m in ("test/f1", "test/auc_pr", "test/far", "test/mae", "h_mae")
                  if m in metrics]
        if wanted:
            try:
                fig = plots.comparison_figure(rows, metrics=wanted, title="Test metrics")
                out.append(dcc.Graph(id=f"{prefix}-bars", figure=fig))
            except TsssmError:
                pass
        return out

    def compare_page(search: str) -> html.Div:
        runs = store.runs()
        wanted = [r for r in ",".join(parse_qs(search.lstrip("?")).get("runs", [])).split(",")
                  if r]
        options = [{"label": f"{r.name} · {r.status} · {r.run_id[:8]}", "value": r.run_id}
                   for r in runs]
        if not runs:
            return html.Div(id="empty-store", children=[
                html.H2("Nothing to compare"),
                html.P(["The store has no runs yet; make some with ", html.Code("tsssm run"),
                        "."])])
        return html.Div([
            html.H2("Compare runs"),
            dcc.Dropdown(options, wanted, id="compare-select", multi=True,
                         placeholder="pick runs (train, score or compare runs)"),
            html.Div(id="compare-content"),
        ])

    def benchmarks_page() -> html.Div:
        tables = D.benchmark_tables(benchmarks_dir)
        if not tables:
            where = benchmarks_dir or "benchmarks/results"
            return html.Div(id="no-benchmarks", children=[
                html.H2("Benchmarks"),
                html.P(f"No benchmark results in {where} yet: the benchmark drivers in "
                       "benchmarks/ (e.g. python benchmarks/accuracy.py) write their JSON "
                       "records there.")])
        out: list[Any] = [html.H2("Benchmarks")]
        for i, t in enumerate(tables):
            out += [html.H3(f"{t.name} (updated {t.modified})"),
                    _table(f"bench-{i}", t.rows, t.columns, filter_action="native",
                           sort_action="native", page_size=25)]
        return html.Div(out, id="benchmarks")

    # -- callbacks -------------------------------------------------------------------------
    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None):
        path = pathname or "/"
        if path.startswith("/run/"):
            return run_page(path[len("/run/"):].strip("/"))
        if path.startswith("/compare"):
            return compare_page(search or "")
        if path.startswith("/benchmarks"):
            return benchmarks_page()
        return runs_page()

    @app.callback(Output("compare-link", "href"), Output("compare-link", "children"),
                  Input("runs-table", "selected_row_ids"))
    def compare_link(selected: list[str] | None):
        if not selected:
            return "/compare", "Compare the selected runs (tick some first)"
        return (f"/compare?runs={quote(','.join(selected))}",
                f"Compare the {len(selected)} selected runs")

    def _scores(run_id: str):
        run = store.run(run_id)
        return run, cache.frame(run, D.SCORES)

    @app.callback(Output("anomaly-window", "data"), Input("anomaly-graph", "relayoutData"),
                  Input("score-stream", "value"), Input("score-split", "value"),
                  State("run-id", "data"), prevent_initial_call=True)
    def anomaly_window(relayout, stream, split, run_id):
        if dash.ctx.triggered_id != "anomaly-graph":
            return None
        s = cache.score_stream(store.run(run_id), stream, split)
        return _parse_window(relayout, np.issubdtype(s.time.dtype, np.datetime64))

    @app.callback(Output("anomaly-graph", "figure"), Output("threshold-value", "children"),
                  Input("score-stream", "value"), Input("score-split", "value"),
                  Input("threshold-slider", "value"), Input("anomaly-window", "data"),
                  State("run-id", "data"), State("threshold-grid", "data"),
                  State("fitted-threshold", "data"))
    def anomaly(stream, split, index, window, run_id, grid, fitted):
        run = store.run(run_id)
        s = cache.score_stream(run, stream, split)
        threshold = grid[int(index)]
        fig = plots.anomaly_figure(
            s.time, s.score, threshold, s.label, s.score > threshold,
            title=f"{run.tags.get('tsssm.model', run.name)}: anomaly score, {stream}",
            log_y=bool((s.score > 0).all()), window=_window(window, s.time))
        text = [html.Strong(f"threshold {threshold:.4g}")]
        if fitted is not None:
            text.append(f"  (fitted: {fitted:.4g}; flags are score > threshold)")
        return fig, text

    @app.callback(Output("live-metrics", "children"), Input("threshold-slider", "value"),
                  State("run-id", "data"), State("threshold-grid", "data"))
    def live_metrics(index, run_id, grid):
        _, scores = _scores(run_id)
        threshold = grid[int(index)]
        m = D.metrics_at(scores, threshold)
        where = ("the test split (all streams)" if "split" in scores.columns
                 else "every scored row")
        if m is None:
            flagged = int((D.evaluated_rows(scores)["score"].to_numpy() > threshold).sum())
            return html.P(f"{flagged} rows flagged ({where}); no labels, so no precision/recall.",
                          id="no-labels")
        cells = [html.Td([html.Div(k.upper() if k in ("far", "mar") else k.capitalize(),
                                   style={"color": "#6b7280", "fontSize": 12}),
                          html.Div(f"{m[k]:.4f}", id=f"metric-{k}",
                                   style={"fontSize": 20, "fontWeight": 600})],
                         style={"paddingRight": "28px"}) for k in D.LIVE]
        return html.Div([
            html.Table(html.Tr(cells)),
            html.P(f"at threshold {threshold:.4g} on {where}: {int(m['n_flagged'])} of "
                   f"{int(m['n'])} rows flagged, {int(m['n_positive'])} labelled anomalous",
                   style={"color": "#6b7280", "fontSize": 12}),
        ])

    @app.callback(Output("interval", "options"), Output("interval", "value"),
                  Input("score-stream", "value"), Input("score-split", "value"),
                  Input("threshold-slider", "value"), State("run-id", "data"),
                  State("threshold-grid", "data"))
    def intervals(stream, split, index, run_id, grid):
        s = cache.score_stream(store.run(run_id), stream, split)
        found = D.flagged_intervals(s, grid[int(index)])
        options = [{"label": iv.label, "value": f"{iv.first}-{iv.last}"} for iv in found]
        return options, (options[0]["value"] if options else None)

    @app.callback(Output("attribution-graph", "figure"), Input("interval", "value"),
                  State("score-stream", "value"), State("score-split", "value"),
                  State("run-id", "data"))
    def attribution(value, stream, split, run_id):
        if not value:
            return plots.message_figure("no flagged interval at this threshold")
        s = cache.score_stream(store.run(run_id), stream, split)
        first, last = (int(v) for v in value.split("-"))
        iv = D.Interval(first, last, s.time[first], s.time[last],
                        float(s.score[first:last + 1].max()))
        return plots.attribution_figure(D.attribution(s, iv),
                                        title=f"{stream}: {iv.label}")

    @app.callback(Output("forecast-window", "data"), Input("forecast-graph", "relayoutData"),
                  Input("fc-stream", "value"), State("run-id", "data"),
                  prevent_initial_call=True)
    def forecast_window(relayout, stream, run_id):
        if dash.ctx.triggered_id != "forecast-graph":
            return None
        run = store.run(run_id)
        f = cache.frame(run, D.FORECASTS)
        t = f.filter(f["stream"] == stream)["time"].head(1).to_numpy()
        return _parse_window(relayout, np.issubdtype(t.dtype, np.datetime64))

    @app.callback(Output("forecast-graph", "figure"), Input("fc-stream", "value"),
                  Input("fc-channels", "value"), Input("forecast-window", "data"),
                  State("run-id", "data"))
    def forecast(stream, channels, window, run_id):
        run = store.run(run_id)
        fs = D.forecast_stream(cache.frame(run, D.FORECASTS), stream, channels or None)
        return plots.forecast_figure(
            fs.time, fs.actual, fs.mean, fs.std, fs.channels,
            title=f"{run.tags.get('tsssm.model', run.name)}: one-step forecast, {stream}",
            window=_window(window, fs.time))

    @app.callback(Output("compare-content", "children"), Input("compare-select", "value"))
    def compare_content(run_ids):
        if not run_ids:
            return html.P("Pick runs above, or tick them in the runs table.",
                          style={"color": "#6b7280"})
        runs = []
        for rid in run_ids:
            try:
                runs.append(store.run(rid))
            except TsssmError as err:
                return html.P(str(err), id="compare-error")
        rows = D.comparison_rows(runs, cache)
        out: list[Any] = [html.H3("Metrics"), *_comparison_block(rows, "compare")]
        scored = [r for r in runs if cache.frame(r, D.SCORES) is not None]
        streams = sorted({s for r in scored for s in D.stream_names(cache.frame(r, D.SCORES))})
        if streams:
            out += [html.H3("Anomaly scores, overlaid (test split)"),
                    dcc.Dropdown(streams, streams[0], id="compare-stream", clearable=False,
                                 style={"width": "320px"}),
                    dcc.Graph(id="compare-scores")]
        fc = [r for r in runs if cache.frame(r, D.FORECASTS) is not None]
        if fc and streams:
            channels = D.forecast_channels(cache.frame(fc[0], D.FORECASTS))
            out += [html.H3("One-step forecasts, overlaid (test split)"),
                    dcc.Dropdown(channels, channels[0], id="compare-channel", clearable=False,
                                 style={"width": "320px"}),
                    dcc.Graph(id="compare-forecasts")]
        return out

    def _label(r: RunRecord) -> str:
        return f"{r.tags.get('tsssm.model', r.name)} ({r.run_id[:8]})"

    @app.callback(Output("compare-scores", "figure"), Input("compare-stream", "value"),
                  State("compare-select", "value"))
    def compare_scores(stream, run_ids):
        series = []
        positive = True
        for rid in run_ids or []:
            run = store.run(rid)
            scores = cache.frame(run, D.SCORES)
            if scores is None or stream not in D.stream_names(scores):
                continue
            s = cache.score_stream(run, stream, "test")
            positive &= bool((s.score > 0).all())
            series.append((_label(run), s.time, s.score))
        if not series:
            return plots.message_figure(f"no selected run has scores of {stream}")
        return plots.overlay_figure(series, f"anomaly scores, {stream}", y_title="score",
                                    log_y=positive)

    @app.callback(Output("compare-forecasts", "figure"), Input("compare-stream", "value"),
                  Input("compare-channel", "value"), State("compare-select", "value"))
    def compare_forecasts(stream, channel, run_ids):
        series, reference = [], None
        for rid in run_ids or []:
            run = store.run(rid)
            f = cache.frame(run, D.FORECASTS)
            if f is None or stream not in D.stream_names(f):
                continue
            fs = D.forecast_stream(f, stream, [channel])
            if fs.channels != [channel]:
                continue
            reference = reference or ("actual", fs.time, fs.actual[:, 0])
            series.append((f"{_label(run)} mean", fs.time, fs.mean[:, 0]))
        if not series:
            return plots.message_figure(f"no selected run has forecasts of {channel} in {stream}")
        return plots.overlay_figure(series, f"one-step forecasts of {channel}, {stream}",
                                    y_title=channel, reference=reference)

    return app
