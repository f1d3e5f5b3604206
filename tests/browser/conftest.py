"""Headless Chromium (Debian's /usr/bin/chromium and /usr/bin/chromedriver) driven by Selenium.

Without Chromium these tests skip with the reason locally and FAIL in CI (CI=true): a person
sees the figures and the dashboard only through a browser, so CI must look too. .ci/run
installs both packages. A failing test leaves a screenshot and the page's HTML in
``test-artifacts/`` (or $TSSSM_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
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
