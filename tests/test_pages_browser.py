"""The server's two pages in a real headless Chromium (Debian's `chromium`, driven by Selenium
through Debian's `chromedriver`; nothing is downloaded): the playground at `/` streams an answer
into the page token by token and fills in its time to first token and tokens/s, shows API errors
from the envelope naming the field, and keeps the conversation; `/docs` renders Swagger UI with
every operation of `/openapi.json` and its "Try it out" reaches the server.

Without chromium these tests skip, saying how to install it; with CONVEYOR_REQUIRE_SYSTEM=1 (as
in CI) they fail instead."""
from __future__ import annotations

import re

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from starlette.routing import Route

from tests.system_deps import require_binary
from tests.test_server_harness import ServerThread, start_tiny_server

WAIT_S = 30

# Records, for the page's first assistant answer, every text it showed while still streaming, so
# the test can tell text that arrived piece by piece from text that appeared all at once.
RECORD_STREAMING = """
window.__seen = [];
new MutationObserver(() => {
  const answer = document.querySelector(".message.assistant.streaming .text");
  if (answer && answer.textContent) window.__seen.push(answer.textContent);
}).observe(document.getElementById("conversation"),
           {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerThread:
    srv = start_tiny_server(tmp_path_factory.mktemp("tiny"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> WebDriver:
    chromium = require_binary(("chromium", "chromium-browser"), "headless browser for the page tests",
                              "chromium chromium-driver")
    chromedriver = require_binary("chromedriver", "WebDriver for chromium", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    # An explicit chromedriver keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def wait(browser: WebDriver, condition, timeout: float = WAIT_S):
    return WebDriverWait(browser, timeout).until(condition)


def set_field(browser: WebDriver, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def send(browser: WebDriver, text: str) -> None:
    set_field(browser, "prompt", text)
    browser.find_element(By.ID, "send").click()


def finished_answers(browser: WebDriver) -> list:
    """Assistant messages that are done streaming (they have stats or an error)."""
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant:not(.streaming)")


def test_playground_streams_an_answer_with_ttft_and_speed(server, browser):
    browser.get(server.base_url + "/")
    assert browser.title == "Conveyor playground"
    model = server.engine.model_name
    wait(browser, lambda b: b.find_element(By.ID, "model").get_attribute("value"))
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert len(options) == 1 and browser.find_element(By.ID, "model").get_attribute("value") == options[0]
    assert "context 256 tokens" in browser.find_element(By.ID, "model-status").text, model

    browser.execute_script(RECORD_STREAMING)
    set_field(browser, "max-tokens", "48")
    send(browser, "Tell me a story.")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"))

    answer = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    text = answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert text.strip() and not answer.find_elements(By.CSS_SELECTOR, ".error")
    # streamed: the page showed growing prefixes of the final answer before it was complete
    seen = list(dict.fromkeys(browser.execute_script("return window.__seen")))
    assert len(seen) >= 2 and all(text.startswith(s) for s in seen), (seen, text)

    ttft = answer.find_element(By.CSS_SELECTOR, ".stats .ttft").text
    speed = answer.find_element(By.CSS_SELECTOR, ".stats .speed").text
    tokens = answer.find_element(By.CSS_SELECTOR, ".stats .tokens").text
    assert re.fullmatch(r"TTFT \d+\.\d\d s", ttft), ttft
    assert re.fullmatch(r"\d+\.\d tok/s", speed) and float(speed.split()[0]) > 0, speed
    n = int(tokens.split()[0])
    assert 2 <= n <= 48, tokens
    assert browser.find_element(By.ID, "send").is_enabled()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == ""


def test_playground_shows_api_errors_and_keeps_the_conversation(server, browser):
    # runs after the test above, on the same page: one exchange is already in the conversation
    set_field(browser, "temperature", "9")
    send(browser, "This one is refused.")
    error = wait(browser, EC.visibility_of_element_located((By.CSS_SELECTOR, ".message.assistant .error")))
    assert "temperature" in error.text and "400" in error.text and "invalid_request_error" in error.text
    # the refused question is out of the conversation and back in the box to edit
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "This one is refused."
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.dropped")) == 2

    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "4")
    browser.execute_script("window.__sent = null; const f = window.fetch; window.fetch = (u, o) => "
                           "{ if (u.endsWith('/chat/completions')) window.__sent = JSON.parse(o.body); "
                           "return f(u, o); };")
    send(browser, "And another?")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message.assistant .stats")) == 2)
    sent = browser.execute_script("return window.__sent")
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["user", "assistant", "user"]  # the first exchange, not the refused one
    assert sent["messages"][0]["content"] == "Tell me a story."
    assert sent["temperature"] == 0 and sent["max_tokens"] == 4 and sent["stream"] is True
    assert sent["model"] == browser.find_element(By.ID, "model").get_attribute("value")


def test_playground_sends_the_api_key_as_bearer(server, browser):
    browser.get(server.base_url + "/")
    browser.execute_script("window.__auth = []; const f = window.fetch; window.fetch = (u, o) => "
                           "{ window.__auth.push((o && o.headers && o.headers.Authorization) || null); "
                           "return f(u, o); };")
    set_field(browser, "api-key", "sk-test-123")
    browser.find_element(By.ID, "temperature").click()  # leaving the field reloads the models with it
    wait(browser, lambda b: b.execute_script("return window.__auth.length") >= 1)
    assert browser.execute_script("return window.__auth")[0] == "Bearer sk-test-123"



def test_playground_stop_keeps_the_partial_answer(server, browser):
    browser.get(server.base_url + "/")
    wait(browser, lambda b: b.find_element(By.ID, "model").get_attribute("value"))
    set_field(browser, "max-tokens", "200")
    send(browser, "Go on for a while.")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(
        lambda b: b.find_element(By.CSS_SELECTOR, ".message.assistant .text").get_attribute("textContent"))
    browser.find_element(By.ID, "stop").click()
    stats = wait(browser, EC.visibility_of_element_located((By.CSS_SELECTOR, ".message.assistant .stats")))
    assert "finish: stopped" in stats.text
    assert int(stats.find_element(By.CSS_SELECTOR, ".tokens").text.split()[0]) < 200
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.dropped")  # the partial answer stays
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()


def test_openapi_document_lists_every_route_of_the_app(server):
    """So that the console at /docs shows every route: each route of the app (not the static
    file mounts) is in /openapi.json with each of its methods."""
    spec = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    routes = {(r.path, m.lower()) for r in server.app.routes if isinstance(r, Route)
              for m in r.methods if m != "HEAD"}
    documented = {(path, m) for path, item in spec["paths"].items() for m in item}
    assert routes - documented == set()

def test_docs_renders_swagger_ui_with_every_route(server, browser):
    spec = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    browser.get(server.base_url + "/docs")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock"))
    shown = {(e.get_attribute("data-path"), e.find_element(By.XPATH, "..").get_attribute("class"))
             for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    paths = {p for p, _ in shown}
    assert paths == set(spec["paths"]), paths ^ set(spec["paths"])
    assert "/" in paths and "/v1/chat/completions" in paths
    assert browser.find_elements(By.CSS_SELECTOR, ".btn.authorize")  # bearer API keys can be entered

    # "Try it out" on GET /version: Swagger UI sends the request to this server and shows the answer
    block = browser.find_element(By.CSS_SELECTOR, "#operations-default-get_version")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(browser, lambda b: block.find_elements(By.CSS_SELECTOR, ".execute"))
    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait(browser, lambda b: block.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
    assert status[0].text.strip().startswith("200")
    assert '"version"' in block.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
