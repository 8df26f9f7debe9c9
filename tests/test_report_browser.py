"""report.html (and a repeats run's evidence.html) in real headless Chromium at 1280 px: images
load, nothing widens the page, the console stays clean. One browser session serves every page
(a few seconds in all)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pfreeze.outputs.evidence import render_evidence
from pfreeze.outputs.report import render_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WIDTH = 1280
MISSING = "`make setup` installs it (apt-get install chromium chromium-driver)"

# Elements whose right edge is past the window, outside any box that scrolls on its own.
OVERFLOW_JS = """
const w = window.innerWidth, bad = [];
const scrolls = el => { for (let a = el.parentElement; a; a = a.parentElement) {
  const o = getComputedStyle(a).overflowX;
  if ((o === 'auto' || o === 'scroll' || o === 'hidden') && a !== document.body
      && a !== document.documentElement) return true; } return false; };
for (const el of document.body.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width && r.right > w + 0.5 && !scrolls(el))
    bad.push(el.tagName + '.' + el.className + ': ' + (el.textContent || '').slice(0, 60));
}
return {scrollWidth: document.documentElement.scrollWidth, innerWidth: w, bad: bad};
"""
# Whether the headline's key column is visible without scrolling its table.
KEY_COLUMN_JS = """
const th = [...document.querySelectorAll('th')].find(t => t.textContent === 'p before → after');
const box = th.closest('.scroll').getBoundingClientRect();
return th.getBoundingClientRect().right <= box.right + 0.5;
"""
IMAGES_JS = """
return [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}));
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing; {MISSING}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed; `make setup` installs it (the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},900", "--hide-scrollbars"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium never tries to download one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def pages(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """report.html of the tiny run, and of the same run killed after step 3."""
    root = tmp_path_factory.mktemp("browser")
    out = {}
    for name in ("finished", "killed"):
        run = root / name
        run.mkdir()
        for f in ("config.yaml", "samples.txt", "metrics.jsonl", "summary.json"):
            shutil.copy(tiny_run.dir / f, run / f)
        if name == "killed":
            (run / "summary.json").unlink()
            kept = [r for r in tiny_run.rows if r["step"] <= 3]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        out[name] = render_report(run)["html"]
    # A repeats run of two repeats (the tiny run twice): its combined evidence report.
    repeats = root / "repeats"
    for r in range(2):
        shutil.copytree(root / "finished", repeats / f"repeat-{r}")
    config = yaml.safe_load((tiny_run.dir / "config.yaml").read_text())
    (repeats / "config.yaml").write_text(yaml.safe_dump({**config, "repeats": 2}))
    out["evidence"] = render_evidence(repeats)["html"]
    return out


@pytest.mark.parametrize("page", ["finished", "killed"])
def test_report_reads_well_at_1280px(browser: Any, pages: dict[str, Path], page: str) -> None:
    browser.get(pages[page].as_uri())
    images = browser.execute_script(IMAGES_JS)
    assert len(images) >= 5 and all(i["ok"] for i in images), images
    layout = browser.execute_script(OVERFLOW_JS)
    assert layout["innerWidth"] == WIDTH, layout
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert layout["bad"] == [], layout["bad"]
    assert browser.execute_script(KEY_COLUMN_JS), "p before → after is scrolled out of view"
    if page == "killed":
        assert "Partial: the run was killed at step" in browser.page_source
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_evidence_report_reads_well_at_1280px(browser: Any, pages: dict[str, Path]) -> None:
    browser.get(pages["evidence"].as_uri())
    images = browser.execute_script(IMAGES_JS)
    assert len(images) == 2 and all(i["ok"] for i in images), images
    layout = browser.execute_script(OVERFLOW_JS)
    assert layout["scrollWidth"] <= layout["innerWidth"] == WIDTH, layout
    assert layout["bad"] == [], layout["bad"]
    assert "2 of 2 repeats finished" in browser.page_source
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
