"""How long a long stream takes to show: figure build, report size, and the time headless
Chromium takes to open the report and draw it, for 10^5..10^7 points; and the dashboard's
callback work (one stream out of a scores frame, the figure, its JSON) for the whole stream
(first view) and for a zoomed window (the re-query; the dashboard keeps the stream's arrays).

    python benchmarks/figures.py [--sizes 100000 1000000 10000000] [--chromium /usr/bin/chromium]

Prints a Markdown table (record it in benchmarks/RESULTS.md with date, machine and command).
Wall-clock times on a shared machine are noisy: run it on an idle one, or read them as orders
of magnitude.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from dashboards import data as D
from tsssm import plots

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def stream(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.exponential(size=n)
    label = np.zeros(n, np.int8)
    for start in rng.integers(0, max(1, n - n // 100), 20):
        label[start : start + n // 200] = 1
    score[label == 1] *= 3
    time_ = (np.datetime64("2024-01-01") + np.arange(n).astype("timedelta64[ms]"))
    return pl.DataFrame({"stream": ["s"] * n, "time": time_, "score": score,
                         "flag": score > 8.0, "label": label})


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = ARGS.chromium
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(ARGS.chromedriver), options=options)
    return driver, profile


def open_time(driver, path: Path) -> float:
    """Seconds from navigation to the score line drawn (polled: the report draws once the
    browser has unpacked its gzipped plotly.js, after the load event)."""
    started = time.perf_counter()
    driver.get(path.as_uri())
    while not driver.execute_script(
            "return [...document.querySelectorAll('.scatterlayer .trace .js-line')]"
            ".some(p => /L/.test(p.getAttribute('d') || ''))"):
        if time.perf_counter() - started > 600:
            raise TimeoutError(f"{path} drew nothing in 600 s")
        time.sleep(0.05)
    return time.perf_counter() - started


def main() -> None:
    rows = []
    driver, profile = browser()
    folder = Path(tempfile.mkdtemp(prefix="bench-figures-"))
    try:
        # 10 points: what loading plotly.js costs by itself; the first size undecimated: what
        # decimation saves
        cases = [(10, 4000)] + [(n, 4000) for n in ARGS.sizes] + [
            (ARGS.sizes[0], 2 * ARGS.sizes[0])]
        warm = D.score_stream(stream(1000), "s", "all")  # plotly builds its validators once
        plots.anomaly_figure(warm.time, warm.score, 8.0, warm.label, warm.score > 8.0,
                             log_y=True).to_json()
        for n, max_points in cases:
            frame = stream(n)
            started = time.perf_counter()
            s = D.score_stream(frame, "s", "all")
            fig = plots.anomaly_figure(s.time, s.score, 8.0, s.label, s.score > 8.0,
                                       log_y=True, max_points=max_points)
            spec = fig.to_json()
            callback = time.perf_counter() - started
            t = s.time
            window = (t[n // 2], t[n // 2 + n // 100])
            started = time.perf_counter()  # the dashboard keeps the stream: figure + JSON
            plots.anomaly_figure(s.time, s.score, 8.0, s.label, s.score > 8.0, log_y=True,
                                 max_points=max_points, window=window).to_json()
            zoom = time.perf_counter() - started
            path = plots.save_report([("score", fig)], folder / f"report-{n}-{max_points}.html")
            opened = min(open_time(driver, path) for _ in range(ARGS.repeat))
            rows.append((n, max_points, len(fig.data[0].x), len(spec) / 1e6,
                         path.stat().st_size / 1e6, callback, zoom, opened))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"chromium: {ARGS.chromium}")
    print("| points | max_points | drawn points | figure JSON (MB) | report (MB) | "
          "first view: stream + figure + JSON (s) | zoom to 1% (s) | Chromium open + draw (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, mp, drawn, js, size, cb, zoom, opened in rows:
        print(f"| {n:,} | {mp:,} | {drawn:,} | {js:.2f} | {size:.1f} | {cb:.2f} | {zoom:.2f} | "
              f"{opened:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--repeat", type=int, default=2)
    ARGS = parser.parse_args()
    main()
