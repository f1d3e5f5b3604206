"""Headless Chromium (Debian's /usr/bin/chromium and /usr/bin/chromedriver) driven by Selenium.

Without Chromium these tests skip with the reason locally and FAIL in CI (CI=true): a person
sees the figures and the dashboard only through a browser, so CI must look too. .ci/run
installs both packages. A failing test leaves a screenshot and the page's HTML in
``test-artifacts/`` (or $TSSSM_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TSSSM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TSSSM_CHROMEDRIVER", "/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TSSSM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
#: flags for Chromium as root on a machine with no network and no display
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} not found (apt-get install -y {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="session")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests need headless Chromium in CI: {missing}", pytrace=False)
        pytest.skip(f"no headless Chromium here: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no network here
    profile = tempfile.mkdtemp(prefix="tsssm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    driver = item.funcargs.get("browser") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and driver is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / item.name.replace("/", "_").replace("[", "_").replace("]", "")
        try:
            driver.save_screenshot(str(stem.with_suffix(".png")))
            stem.with_suffix(".html").write_text(driver.page_source, encoding="utf-8")
            report.sections.append(("browser", f"screenshot: {stem.with_suffix('.png')} "
                                               f"(page {driver.current_url})"))
        except Exception as err:  # the browser itself may be what failed
            report.sections.append(("browser", f"no screenshot: {err}"))


#: what a person sees of every plotly graph on the page: drawn lines (an SVG path with at least
#: two points), filled areas, markers, bars (of non-zero size), shaded shapes, tick labels,
#: titles and legend
_SUMMARY_JS = """
const real = p => { const d = p.getAttribute('d') || ''; return /[LHV]/.test(d) && d !== 'M0,0Z'; };
const visible = p => { const b = p.getBBox(); return b.width > 0.5 && b.height > 0.5; };
return [...document.querySelectorAll('.js-plotly-plot')].map(gd => {
  const all = sel => [...gd.querySelectorAll(sel)];
  const text = sel => all(sel).map(t => t.textContent);
  return {
    id: (gd.closest('[id]') || gd).id,
    lines: all('.scatterlayer .trace .js-line').filter(real).length,
    fills: all('.scatterlayer .trace .js-fill').filter(real).length,
    markers: all('.scatterlayer .trace .points path').filter(
        p => (p.getAttribute('d') || '').length > 0 && p.getAttribute('transform')).length,
    bars: all('.barlayer .point path').filter(real).filter(visible).length,
    shapes: all('.shapelayer path').filter(real).length,
    xticks: text('.xaxislayer-above text'),
    yticks: text('.yaxislayer-above text'),
    title: text('.gtitle').join(' '),
    subtitle: text('.gtitle-subtitle').join(' '),
    legend: text('.legendtext'),
    traces: (gd.data || []).length,
    points: (gd.data || []).map(t => (t.x || []).length),
  };
});
"""


class Probe:
    """Open pages in the shared browser and read what they draw."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def open(self, url: str, wait_for: str | None = None, timeout: float = 60) -> None:
        self.driver.get(url)
        if wait_for:
            self.wait_css(wait_for, timeout)

    def wait(self, condition, timeout: float = 60, what: str = "condition"):
        """Poll ``condition(driver)`` until it is truthy; returns its value. An element that
        Dash re-renders between finding and reading it (stale) or not yet there counts as not
        yet."""
        from selenium.common.exceptions import (
            JavascriptException,
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(
            self.driver, timeout, poll_frequency=0.2,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException,
                                JavascriptException, KeyError, TypeError),
        ).until(condition,
                message=f"waited {timeout:.0f}s for {what} at {self.driver.current_url}")

    def idle(self, timeout: float = 60, quiet: int = 3) -> None:
        """Wait until no Dash callback is pending (no element marked data-dash-is-loading) for
        ``quiet`` polls in a row: interact only with a page that has settled."""
        calm = [0]

        def settled(d):
            busy = d.execute_script(
                "return document.querySelectorAll('[data-dash-is-loading=\"true\"]').length")
            calm[0] = 0 if busy else calm[0] + 1
            return calm[0] >= quiet

        self.wait(settled, timeout, "the page's callbacks to finish")

    def wait_css(self, css: str, timeout: float = 60):
        from selenium.webdriver.common.by import By

        return self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, css), timeout, css)

    def graphs(self) -> dict[str, dict]:
        """{id of the graph's element: its summary} for every plotly graph on the page."""
        return {g["id"]: g for g in self.driver.execute_script(_SUMMARY_JS)}

    def graph(self, element_id: str, timeout: float = 60, **at_least: int) -> dict:
        """The summary of graph ``element_id`` once it draws at least the given numbers of
        lines/bars/markers/... (default: one line or bar)."""
        need = at_least or {"drawn": 1}

        def ready(_):
            g = self.graphs().get(element_id)
            if g is None:
                return None
            g["drawn"] = g["lines"] + g["bars"]
            return g if all(g.get(k, 0) >= v for k, v in need.items()) else None

        return self.wait(ready, timeout, f"graph #{element_id} drawing {need}")

    def text(self, css: str) -> str:
        """The visible text of the first element matching ``css`` (read again if Dash replaced
        the element meanwhile)."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        for _ in range(20):
            try:
                return self.driver.find_element(By.CSS_SELECTOR, css).text
            except StaleElementReferenceException:
                continue
        return self.driver.find_element(By.CSS_SELECTOR, css).text


@pytest.fixture()
def probe(browser) -> Probe:
    return Probe(browser)


_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"\d{1,2}:\d\d(:\d\d(\.\d+)?)?"
_DATE_TICK = re.compile(rf"^({_TIME})?\s*({_MONTH}( \d{{1,2}})?,? ?(\d{{4}})?)?$|^\d{{4}}$")


def date_ticks(ticks: list[str]) -> bool:
    """True if every tick label reads as a time or date (plotly's formats: '10:22', '10:22
    Mar 9, 2020', 'Mar 9', '2020') and at least one names a month."""
    ticks = [t.strip() for t in ticks if t.strip()]
    return bool(ticks) and all(_DATE_TICK.match(t) for t in ticks) and \
        any(re.search(_MONTH, t) for t in ticks)


@pytest.fixture(scope="session")
def reads_dates():
    return date_ticks


@pytest.fixture(scope="session")
def serve():
    """serve(app) -> base URL: a Dash app on a free loopback port, in a thread, for the
    session."""
    import threading

    from werkzeug.serving import make_server

    servers = []

    def start(app) -> str:
        server = make_server("127.0.0.1", 0, app.server, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="session")
def trained_store(browser, tmp_path_factory) -> dict:
    """A store made by the real commands on the bundled sample: a `tsssm train` (Kalman, EM,
    a few iterations), a `tsssm score` of it, a `tsssm compare` of it with two classical
    comparators, a train that FAILED (its data file is missing),
    a run still RUNNING, and a score run whose scores carry per-channel attribution columns
    (``contrib:<channel>``, built here from the real scores). {name: run id, "uri": ...}."""
    import numpy as np
    import polars as pl

    from tsssm.anomaly.metrics import anomaly_metrics
    from tsssm.cli import main
    from tsssm.tracking import RunStore, Tracker

    root = tmp_path_factory.mktemp("dashboard-store")
    uri = f"sqlite:///{root}/mlflow.db"
    common = [f"tracking.uri={uri}", f"tracking.artifact_root={root}/artifacts",
              f"tracking.output_dir={root}/out", "trainer.enable_progress_bar=false",
              "data.eval_stride=64"]
    # a window and risk that flag rows of the first stream's test split (the run page's figures
    # draw flagged points and intervals); the task's defaults flag none of valve1/0's there
    assert main(["train", *common, "model.fit=em", "model.em_iters=5", "task.window.size=30",
                 "task.threshold.risk=0.001"]) == 0
    store = RunStore(uri)
    (train,) = [r.run_id for r in store.runs()]
    assert main(["score", *common, f"model.run_id={train}"]) == 0
    assert main(["compare", *common, f"compare.runs=[{train}]",
                 "task.baselines=[last_value,ewma]"]) == 0
    assert main(["train", *common, "data=csv", f"data.path={root}/missing.csv"]) != 0
    runs = {r.command + "-" + r.status: r.run_id for r in store.runs()}

    tracker = Tracker(uri, "tsssm")
    running = tracker.client.create_run(tracker.experiment_id, run_name="train-still-running",
                                        tags={"tsssm.command": "train"}).info.run_id
    frame = pl.read_parquet(store.fetch(train, "scores/scores.parquet"))
    frame = frame.filter(pl.col("split") == "test").drop("split")
    channels = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure",
                "Temperature", "Thermocouple", "Voltage", "Volume Flow RateRMS"]
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(len(channels)), frame.height)
    flagged = frame["flag"].to_numpy()
    weights[flagged] = 0.02  # flagged rows: Pressure carries most of the score
    weights[flagged, channels.index("Pressure")] = 1 - 0.02 * (len(channels) - 1)
    score = frame["score"].to_numpy()
    frame = frame.with_columns([pl.Series(f"contrib:{c}", score * weights[:, j])
                                for j, c in enumerate(channels)])
    folder = root / "attribution"
    (folder / "scores").mkdir(parents=True)
    frame.write_parquet(folder / "scores" / "scores.parquet")
    m = anomaly_metrics(frame["label"].to_numpy(), flagged, score)
    with tracker.start("score-with-attribution", "score", {"data.name": "skab_sample"},
                       {"tsssm.model": "kalman", "tsssm.data": "skab_sample",
                        "tsssm.source_run": train}) as run:
        tracker.log_metrics({f"test/{k}": v for k, v in m.items()})
        tracker.log_dir(folder / "scores", "scores")
    bench = root / "benchmarks"
    bench.mkdir()
    (bench / "accuracy.json").write_text(
        '[{"dataset": "skab", "model": "kalman", "metric": "f1", "value": 0.31, '
        '"source": "this repo"}, {"dataset": "skab", "model": "LSTM-AE", "metric": "f1", '
        '"value": 0.4, "source": "SKAB leaderboard"}]')
    store.close()
    return {"uri": uri, "train": train, "score": runs["score-FINISHED"],
            "compare": runs["compare-FINISHED"],
            "failed": runs["train-FAILED"], "running": running, "attribution": run.run_id,
            "benchmarks": bench, "channels": channels}
