"""/playground in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a
real `csmf serve`: the page loads, a slider moves the list, the overlap of the two triplets is
shown, and save-as-scenario fails visibly with a wrong token and works with the right one."""

from __future__ import annotations

import re
import shutil

import pytest
from fixtures.services import AUTH, TOKEN

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed: apt-get install -y chromium (what .ci/run does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 900})
            pg.set_default_timeout(20_000)
            yield pg
        finally:
            browser.close()


def _ids(page, panel: str) -> list[str]:
    return page.eval_on_selector_all(
        f"#panel-{panel} .items li", "els => els.map(e => e.dataset.item)"
    )


def test_playground_moves_compares_and_saves(bundles, serve, page, tmp_path):
    svc = serve(bundles["flat"])
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{svc.url}/playground")
    page.wait_for_function("document.querySelectorAll('#panel-a .items li').length === 10")
    page.wait_for_function("document.querySelectorAll('#panel-b .items li').length === 10")
    assert "cold start" in page.inner_text("#status")  # the page's default user "1" is unknown here
    page.fill("#user", "u3")  # a known user
    page.click("#go")

    def api(weights) -> list[str]:
        body = {"user_id": "u3", "k": 10, "weights": weights}
        return [i["item_id"] for i in svc.client.post("/v1/retrieve", json=body).json()["items"]]

    a_ids = "JSON.stringify([...document.querySelectorAll('#panel-a .items li')].map(e => e.dataset.item))"
    before = api({"exposure": 1, "click": 1.8, "conversion": 1.2})  # A starts at the default
    page.wait_for_function(f"want => {a_ids} === JSON.stringify(want)", arg=before)
    assert "cold start" not in page.inner_text("#status")
    assert "Item number" in page.inner_text("#panel-a .items")  # titles from the bundle
    assert page.locator("#panel-a .bars .bar").count() == 30  # a score bar per objective

    # move triplet A's sliders with the keyboard (native input events): exposure → 0, click → 5
    page.focus("#w-A-exposure")
    page.keyboard.press("Home")
    page.focus("#w-A-click")
    page.keyboard.press("End")
    assert page.input_value("#w-A-exposure") == "0" and page.inner_text("#v-A-click") == "5.0"
    want = api({"exposure": 0, "click": 5, "conversion": 1.2})
    assert want != before  # (this model's lists differ under the two triplets)
    page.wait_for_function(f"want => {a_ids} === JSON.stringify(want)", arg=want)
    page.wait_for_function("document.querySelectorAll('#panel-b .items li').length === 10")
    a, b = _ids(page, "a"), _ids(page, "b")

    shared = len(set(a) & set(b))
    text = page.inner_text("#overlap")
    assert re.fullmatch(rf"overlap: {shared} of 10 items \(\d+%\)", text), text
    assert page.locator("#panel-a li.shared").count() == shared

    # save as scenario: a wrong token fails visibly and creates nothing
    page.fill("#scenario-name", "from-browser")
    page.click("#save")
    page.fill("#token", "wrong-token")
    page.click("#save-confirm")
    page.wait_for_selector("#save-result .error")
    assert "HTTP 403" in page.inner_text("#save-result")
    assert svc.client.get("/admin/scenarios/from-browser", headers=AUTH).status_code == 404
    # ... the right one creates it with triplet A's weights, and the token is not kept
    page.click("#save")
    assert page.input_value("#token") == ""
    page.fill("#token", TOKEN)
    page.click("#save-confirm")
    page.wait_for_selector("#save-result .ok")
    got = svc.client.get("/admin/scenarios/from-browser", headers=AUTH).json()
    assert got["weights"] == {"exposure": 0.0, "click": 5.0, "conversion": 1.2}
    assert page.input_value("#token") == ""
    assert TOKEN not in page.evaluate("JSON.stringify(localStorage) + document.cookie")
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert not errors, errors
