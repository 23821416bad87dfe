"""The web chat page end to end in headless Chromium (Debian's `chromium` driven by Playwright through
`executable_path`): type a message, see the streamed reply, the collapsible reasoning and a tool call.
Skipped when Playwright or a Chromium binary is missing."""
import contextlib
import json
import shutil

import pytest

from engine_utils import one_thread  # noqa: F401
from server_utils import ScriptedEngine, live_server
from test_server_openai import SCRIPTS, TOOLS
from nemotron3.checkpoint import load
from nemotron3.server import create_app
from nemotron3.tokenizer import load_tokenizer

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")


@contextlib.contextmanager
def chromium_page():
    """(a new page in headless Chromium, the list its uncaught page errors go to); the browser closes after."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page, errors = browser.new_page(), []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page_url(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, SCRIPTS, max_num_seqs=2, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny")) as url:
        yield url


def test_chat_page_streams_reasoning_answer_and_tool_calls(page_url):
    with chromium_page() as (page, errors):
        page.goto(page_url + "/")
        sync_api.expect(page.locator("#model-name")).to_contain_text("tiny")
        # thinking on: reasoning in a <details>, collapsed once the answer streams
        page.fill("#input", "hi SCRIPT_HELLO")
        page.press("#input", "Enter")
        answer = page.locator(".msg.assistant .content").last
        sync_api.expect(answer).to_have_text("Hello! How can I help you today?", timeout=15000)
        details = page.locator(".msg.assistant details.reasoning").last
        sync_api.expect(details).to_contain_text("Let me think.")
        assert details.get_attribute("open") is None
        sync_api.expect(page.locator(".msg.assistant .stats").last).to_contain_text("tokens")
        # thinking off: no reasoning block
        page.uncheck("#thinking")
        page.fill("#input", "SCRIPT_PLAIN")
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant .content").last).to_have_text("Plain answer.", timeout=15000)
        assert page.locator(".msg.assistant").last.locator("details").count() == 0
        # tools: the call is shown
        page.check("#thinking")
        page.fill("#tools", json.dumps(TOOLS))
        page.fill("#input", "SCRIPT_WEATHER")
        page.click("#send")
        call = page.locator(".msg.assistant .tool-call").last
        sync_api.expect(call).to_contain_text("get_weather", timeout=15000)
        sync_api.expect(call).to_contain_text('"city": "Paris"')
        assert not errors, errors


def test_api_key_stays_in_memory_unless_remembered(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, SCRIPTS, max_num_seqs=2, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny", api_key="s3cret")) as url, \
            chromium_page() as (page, errors):
        stored = lambda: page.evaluate("localStorage.getItem('nemotron3:api-key')")  # noqa: E731
        page.goto(url + "/")
        sync_api.expect(page.locator("#model-name")).to_contain_text("cannot list models")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        sync_api.expect(page.locator("#model-name")).to_contain_text("tiny")
        assert stored() is None and not page.is_checked("#remember-key")
        page.reload()
        assert page.input_value("#api-key") == ""                      # forgotten with the page
        page.fill("#api-key", "s3cret")
        page.check("#remember-key")
        assert stored() == "s3cret"
        page.reload()
        assert page.input_value("#api-key") == "s3cret" and page.is_checked("#remember-key")
        sync_api.expect(page.locator("#model-name")).to_contain_text("tiny")
        page.uncheck("#remember-key")
        assert stored() is None


CALC_SCRIPTS = {
    "Use the calculator.": "I need 17 * 5.\n</think>\n<tool_call>\n<function=calculator>\n<parameter=expression>\n"
                           "17 * 5\n</parameter>\n</function>\n</tool_call>",
    "<tool_response>\n85": "The calculator says 85.\n</think>\nThe answer is:\n85",
}
EXPRESSIONS = ["17 * 5", "2 ** 10 - 7 // 2 + -3 % 5", "-2 ** 2", "(1 + 2) * 3 / 4", "10 / 3", "7 // -2",
               "2 ^ 3 × 4 ÷ 8", "1 / 0", "2 ** 1000", "__import__('os')", "", "3 +", "0.1 + 0.2", "1e3 * 2"]


def test_calculator_tool_runs_in_the_page(server_model_dir):
    from nemotron3.train.envs.calc import calculate
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, CALC_SCRIPTS, max_num_seqs=2, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny")) as url, chromium_page() as (page, errors):
        page.goto(url + "/")
        sync_api.expect(page.locator("#model-name")).to_contain_text("tiny")
        # the page's evaluator agrees with the calculator pico was trained with (errors in its own words)
        def same(r):
            return "error" if r.startswith("error") else r
        got = page.evaluate("(xs) => xs.map(calculate)", EXPRESSIONS)
        assert [same(r) for r in got] == [same(calculate(x)) for x in EXPRESSIONS], got
        assert page.is_checked("#calculator")
        page.fill("#input", "What is 17 * 5? Use the calculator.")
        page.press("#input", "Enter")
        call = page.locator(".msg.assistant .tool-call").first
        sync_api.expect(call).to_contain_text("calculator", timeout=15000)
        sync_api.expect(call).to_contain_text("17 * 5")
        sync_api.expect(page.locator(".msg.assistant .tool-result").first).to_have_text("tool result: 85")
        final = page.locator(".msg.assistant .content").last
        sync_api.expect(final).to_have_text("The answer is:\n85", timeout=15000)
        assert page.locator(".msg.assistant").count() == 2 and not errors, errors
