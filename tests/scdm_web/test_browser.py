"""scdm-web in a real browser (headless Debian Chromium through Playwright): browse, upload, predict, download."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import pytest

from .conftest import N_UPLOAD

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(server) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        yield pg
        ctx.close()
        browser.close()


def _svg_ok(page, selector: str = "figure svg") -> int:
    """Number of rendered SVGs: each laid out with a non-zero box and drawn paths."""
    boxes = page.eval_on_selector_all(selector, "els => els.map(e => [e.getBoundingClientRect().width, "
                                      "e.getBoundingClientRect().height, e.querySelectorAll('path,use').length])")
    assert boxes, "no SVG on the page"
    for w, h, n in boxes:
        assert w > 100 and h > 100 and n > 5, (w, h, n)
    return len(boxes)


def test_browse_pages(server, page, web_data, tmp_path):
    page.goto(server.url + "/")
    assert page.locator("#datasets td").first.inner_text() == "pc9"
    assert "hvg" in page.content() and "cells/s" in page.content()
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

    page.goto(server.url + "/leaderboard")
    rows = page.locator("main table tbody tr")
    assert rows.count() == 4  # 2 models x 2 classifiers
    assert rows.first.locator("td").nth(4).inner_text() == "logreg"  # ranked by AUROC: majority (0.5) last
    page.select_option("select[name=classifier]", "majority")
    page.click("form.filters button")
    page.wait_for_url("**/leaderboard?*classifier=majority*")
    assert page.locator("main table tbody tr").count() == 2
    page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)

    page.goto(server.url + "/figures")
    assert _svg_ok(page) == 2  # bars + radar
    page.screenshot(path=str(tmp_path / "figures.png"), full_page=True)
    page.click("text=pca")
    page.wait_for_url("**/figures/umap/pca")
    assert _svg_ok(page) == 1
    page.screenshot(path=str(tmp_path / "umap.png"), full_page=True)


def test_upload_predict_download(server, page, web_data, tmp_path):
    page.goto(server.url + "/predict")
    page.select_option("#model", "pca")
    page.select_option("#bundle", "bundles/pca_logreg")
    page.set_input_files("input[name=file]", str(web_data.upload))
    page.screenshot(path=str(tmp_path / "predict.png"), full_page=True)
    page.click("#predict button[type=submit]")
    page.wait_for_url("**/jobs/*")
    page.locator("#download, #error").first.wait_for(state="visible", timeout=180_000)
    assert page.locator("#error").count() == 0, page.locator("#error").inner_text()
    link = page.locator("#download")
    page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
    href = link.get_attribute("href")
    assert href and href.endswith("/predictions.csv")
    resp = page.request.get(server.url + href)
    assert resp.ok and resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text())))
    assert len(rows) == N_UPLOAD
    assert {r["model"] for r in rows} == {"pca"}
    p = [float(r["p_sensitive"]) for r in rows]
    assert all(0.0 <= x <= 1.0 for x in p)
    assert {r["predicted"] for r in rows} <= {"sensitive", "resistant"}
    assert "predicted sensitive" in page.locator("#result").inner_text()


def test_bad_upload_shows_message_on_page(server, page, web_data, tmp_path):
    bad = tmp_path / "cells.h5ad"
    bad.write_text("gene,cell\nA,1\n")
    page.goto(server.url + "/predict")
    page.set_input_files("input[name=file]", str(bad))
    page.click("#predict button[type=submit]")
    err = page.locator("#error")
    err.wait_for(state="visible")
    assert "AnnData" in err.inner_text() and "fix:" in err.inner_text()
    page.screenshot(path=str(tmp_path / "bad_upload.png"), full_page=True)
