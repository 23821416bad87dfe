"""The web chat page end to end in headless Chromium (Debian's `chromium` driven by Playwright through
`executable_path`): type a message, see the streamed reply, the collapsible reasoning and a tool call.
Skipped when Playwright or a Chromium binary is missing."""
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


@pytest.fixture(scope="module")
def page_url(server_model_dir):
    tok = load_tokenizer(server_model_dir)
    engine = ScriptedEngine(load(server_model_dir), tok, SCRIPTS, max_num_seqs=2, max_model_len=1024)
    with live_server(create_app(engine, served_model_name="tiny")) as url:
        yield url


def test_chat_page_streams_reasoning_answer_and_tool_calls(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
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
        finally:
            browser.close()
