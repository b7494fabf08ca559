"""The API documentation pages render in a real browser on a host without
internet access: headless Chromium (Debian's, driven by Selenium through
Debian's chromedriver) loads /docs and /redoc from a running `blkserve
serve`, executes their scripts, and the rendered page lists every operation.
Every request the browser makes goes to the daemon: any other host name is
unresolvable for this browser, and the network log is checked as well.
Swagger UI's "Authorize" with the token makes "Try it out" answer 200 where
it answered 401 before.  Screenshots: build/test-artifacts/."""

from __future__ import annotations

import json
import shutil

import pytest
from apiserver import REPO, serving

ARTIFACTS = REPO / "build" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (make setup installs them)")


@pytest.fixture(scope="module")
def server():
    with serving() as srv:
        with srv.client() as c:
            assert c.post("/v1/volumes", json={"name": "docvol", "size_bytes": 1 << 20}
                          ).status_code == 201
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                # offline: no name but the loopback address resolves
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _requests(driver) -> list[str]:
    """URLs the page sent requests to since the last call (Chrome's network
    log; a request the page's Content-Security-Policy blocked was not sent)."""
    urls, blocked = {}, set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif msg["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    return [u for r, u in urls.items() if r not in blocked]


def _operations(server) -> set[tuple[str, str]]:
    doc = json.loads(server.client().get("/openapi.json").text)
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def _wait(driver, cond, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: cond(d), message=f"waiting for {what}")


def _offsite(urls: list[str], base: str) -> list[str]:
    return [u for u in urls if not (u.startswith(base + "/") or u.startswith(("data:", "blob:")))]


def _shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def test_swagger_ui_lists_every_operation_with_no_request_leaving_the_host(server, browser):
    from selenium.webdriver.common.by import By

    _requests(browser)  # empty the log
    browser.get(server.url + "/docs")
    expected = _operations(server)

    def rendered(d):
        blocks = d.find_elements(By.CSS_SELECTOR, ".opblock-summary")
        ops = set()
        for b in blocks:
            method = b.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text
            path = b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute(
                "data-path")
            ops.add((method.upper(), path))
        return ops if ops >= expected else None

    ops = _wait(browser, rendered, "Swagger UI to list the operations")
    _shot(browser, "docs.png")
    assert ops == expected, ops ^ expected
    urls = _requests(browser)
    assert any(u.endswith("/openapi.json") for u in urls), urls
    assert any("swagger-ui-bundle.js" in u for u in urls), urls
    assert not _offsite(urls, server.url), urls


def test_swagger_ui_authorize_with_the_token_makes_try_it_out_answer(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/docs")
    path = "/v1/volumes"

    def block(d):
        for b in d.find_elements(By.CSS_SELECTOR, ".opblock.opblock-get"):
            p = b.find_element(By.CSS_SELECTOR, ".opblock-summary-path")
            if p.get_attribute("data-path") == path:
                return b
        return None

    op = _wait(browser, block, f"the GET {path} operation")
    op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    _wait(browser, lambda d: op.find_elements(By.CSS_SELECTOR, ".try-out__btn"), "Try it out")
    op.find_element(By.CSS_SELECTOR, ".try-out__btn").click()

    def execute_status() -> str:
        _wait(browser, lambda d: op.find_elements(By.CSS_SELECTOR, ".btn.execute"), "Execute")
        for old in op.find_elements(By.CSS_SELECTOR, ".btn-clear"):
            old.click()  # the previous response goes, so the wait sees the new one
        op.find_element(By.CSS_SELECTOR, ".btn.execute").click()
        cell = _wait(browser, lambda d: op.find_elements(
            By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"),
            "the response")
        return cell[0].text.strip()

    assert execute_status().startswith("401")  # not authorized yet

    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .btn.authorize").click()
    field = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux input"),
                  "the Authorize dialog")[0]
    field.send_keys(server.token)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .btn-done").click()

    assert execute_status().startswith("200")
    body = op.find_element(By.CSS_SELECTOR, ".live-responses-table").get_attribute("textContent")
    assert '"docvol"' in body, body
    _shot(browser, "docs-authorized.png")


def test_redoc_lists_every_operation_with_no_request_leaving_the_host(server, browser):
    from selenium.webdriver.common.by import By

    _requests(browser)
    browser.get(server.url + "/redoc")
    expected = _operations(server)
    sections = _wait(browser, lambda d: (lambda s: s if len(s) >= len(expected) else None)(
        d.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']")),
        "ReDoc to render the operations")
    _shot(browser, "redoc.png")
    assert len(sections) == len(expected)
    urls = _requests(browser)
    assert any("redoc.standalone.js" in u for u in urls), urls
    assert not _offsite(urls, server.url), urls
