"""A real browser (Playwright driving Debian's headless chromium) against the UI served with tiny-sd3, once open on
127.0.0.1 and once with authentication (the browser logs in through Gradio's login page first)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_app import serve


CHROMIUM = os.environ.get("HEADPAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (apt install chromium; .ci/run does)"
)


USER, PASSWORD = "alice", "browser-lantern-harbor"


def log_in(page) -> None:
    """Fill Gradio's login form (a text field, a password field and a Login button) and wait for the app."""
    page.wait_for_selector("input[type=password]", timeout=60_000)
    page.locator("input[type=text], textarea").first.fill(USER)
    page.locator("input[type=password]").fill(PASSWORD)
    page.get_by_role("button", name="Login").click()


@pytest.fixture(scope="module", params=["open", "auth"])
def page(request, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp(f"browser-{request.param}")
    auth = [(USER, PASSWORD)] if request.param == "auth" else None
    demo, url = serve("tiny-sd3", tmp, auth=auth)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        if auth:
            log_in(page)
        page.wait_for_selector("#prompt textarea", timeout=60_000)
        page.shot_prefix = f"{request.param}-"
        yield page
        browser.close()
    demo.close()


def _shot(page, name: str) -> Path:
    folder = Path(os.environ.get("HEADPAG_SCREENSHOTS", "test-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{getattr(page, 'shot_prefix', '')}{name}"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_generate_in_the_browser(page):
    page.fill("#prompt textarea", "a lighthouse at dusk")
    page.fill("#pag-heads textarea", "1")
    page.click("#generate-btn")
    for element in ("#out-pag", "#out-nopag"):
        page.wait_for_selector(f"{element} img", timeout=120_000)
    sources = [page.get_attribute(f"{e} img", "src") for e in ("#out-pag", "#out-nopag")]
    assert all(sources) and sources[0] != sources[1]
    assert page.locator("#gallery img").count() >= 1
    for element in ("#out-pag img", "#out-nopag img"):  # 96 px images shown large and sharp
        shown = page.locator(element).evaluate(
            "img => { const r = img.getBoundingClientRect(), s = getComputedStyle(img);"
            " return {w: r.width, h: r.height, rendering: s.imageRendering, fit: s.objectFit}; }"
        )
        assert max(shown["w"], shown["h"]) >= 256 and shown["rendering"] == "pixelated", shown
    fits = page.locator("#gallery img").evaluate_all("imgs => imgs.map(img => getComputedStyle(img).objectFit)")
    assert fits and set(fits) == {"contain"}  # whole images in the gallery, not cropped
    assert _shot(page, "generate.png").stat().st_size > 0


def test_grid_click_toggles_a_head(page):
    from headpag.app.heads_grid import CELL, LEFT, TOP

    page.get_by_role("tab", name="Heads").click()
    grid = page.locator("#head-grid img")
    grid.wait_for(timeout=30_000)
    page.wait_for_function(  # loaded, so that its natural size is known
        "sel => { const img = document.querySelector(sel); return img && img.complete && img.naturalWidth > 0; }",
        arg="#head-grid img",
        timeout=30_000,
    )
    spec = page.locator("#pag-heads textarea")  # one head-set field, shared by the tabs
    before = spec.input_value()
    geometry = grid.evaluate(
        "img => ({nw: img.naturalWidth, nh: img.naturalHeight, w: img.clientWidth, h: img.clientHeight})"
    )
    scale = min(geometry["w"] / geometry["nw"], geometry["h"] / geometry["nh"])
    dx, dy = (geometry["w"] - geometry["nw"] * scale) / 2, (geometry["h"] - geometry["nh"] * scale) / 2
    layer, head = 2, 3
    x, y = LEFT + head * CELL + CELL / 2, TOP + layer * CELL + CELL / 2
    source = grid.get_attribute("src")
    grid.click(position={"x": dx + x * scale, "y": dy + y * scale})
    page.wait_for_function(
        "([sel, before]) => document.querySelector(sel).value !== before", arg=["#pag-heads textarea", before]
    )
    assert spec.input_value() == "1, 2.3"  # layer 1 typed before generating, plus the clicked head
    # the grid is redrawn with the head marked: click the new image, not the one being replaced
    page.wait_for_function(
        "([sel, old]) => { const img = document.querySelector(sel); return img && img.src !== old && img.complete; }",
        arg=["#head-grid img", source],
        timeout=30_000,
    )
    grid.click(position={"x": dx + x * scale, "y": dy + y * scale})
    page.wait_for_function("sel => document.querySelector(sel).value === '1'", arg="#pag-heads textarea")
    assert _shot(page, "heads.png").stat().st_size > 0
