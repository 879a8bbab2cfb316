"""The playground's Chat panel for chat-LLM bundles, in headless Chromium through Selenium
(skipped only where chromium / chromedriver are not installed).

The page is served by ``tests.chat_stub.ChatStub``: the real playground page plus a streaming
``/v1/chat/completions`` in OpenAI's shape that records what it is sent and what it streams, so
the tests check the page's requests and that Stop hangs up.

Every test runs twice: against the stub's own answers, and with the stub relaying both routes
to a real ``modalforge serve`` of a tiny chat bundle (``tests.tiny_llm``'s Gemma, tiny towers):
every assertion compares the page with what was relayed (the stub's answer text is never
assumed). Stop is checked on the stub only: the tiny model writes its 500 tokens before a
click lands (the real server's hang-up handling is ``test_chat_serving``'s). Set
``MODALFORGE_CHAT_UPSTREAM`` to relay the second run to another server instead.
"""

import base64
import io
import os
import shutil
import time
import wave
from pathlib import Path

import pytest

from .chat_stub import CLASSIFIER_CARD, ChatStub

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver)",
)

KEY = "open-sesame"
EMOJI = Path(__file__).parent / "data" / "emoji_1f600.png"


@pytest.fixture(scope="module")
def tiny_chat_server(tmp_path_factory):
    """A real ``modalforge serve`` of an untrained tiny chat bundle (started on first use)."""
    from modalforge.tasks.chat.predictor import ChatPredictor
    from tests.serving import running_server
    from tests.tiny_llm import tiny_gemma, tiny_tokenizer

    root = tmp_path_factory.mktemp("playground-chat")
    tiny_gemma(seed=0).save_pretrained(root / "llm")
    tiny_tokenizer().save_pretrained(root / "llm")
    chat = ChatPredictor(str(root / "llm"), image_encoder="cnn", image_kwargs={"image_size": 32},
                         audio_encoder="audio_cnn", image_tokens=4, audio_tokens=2,
                         cache_dir=root / "cache")  # fmt: skip
    chat.save(root / "bundle")
    with running_server(root / "bundle") as (url, _):
        yield url


@pytest.fixture(scope="module", params=["stub", "real"])
def stub(request):
    if request.param == "stub":
        return ChatStub(api_key=KEY)
    upstream = os.environ.get("MODALFORGE_CHAT_UPSTREAM")
    return ChatStub(upstream=upstream or request.getfixturevalue("tiny_chat_server"))


@pytest.fixture(scope="module")
def server(stub):
    with stub.serve() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--no-first-run", "--window-size=1200,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=f"timed out waiting for {what}")


def find(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def finds(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def settle(page, stub, before: int) -> dict:
    """Waits for the answer to request number ``before`` + 1 to finish; -> its bubble's state."""
    wait_for(page, lambda d: len(stub.requests) > before, "the chat request")
    wait_for(page, lambda d: finds(d, "#chat-log .msg.assistant")
             and finds(d, "#chat-log .msg.assistant")[-1].get_attribute("data-state")
             not in (None, "streaming"), "the end of the answer")  # fmt: skip
    return finds(page, "#chat-log .msg.assistant")[-1]


def say(page, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = find(page, "#chat-input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def set_field(page, selector: str, value: str) -> None:
    field = find(page, selector)
    field.clear()
    field.send_keys(value)


@pytest.fixture(scope="module")
def page(server, browser, stub):
    """The playground on the LLM card, unlocked with the API key where the stub wants one."""
    browser.get(server + "/")
    if stub.api_key:
        wait_for(browser, lambda d: find(d, "#auth-note").is_displayed(), "the API-key notice")
        find(browser, "#api-key").send_keys(KEY)
        find(browser, "#key-form button").click()
    wait_for(browser, lambda d: find(d, "#chat").is_displayed(), "the Chat panel")
    return browser


def test_chat_panel_only_for_a_chat_llm(page, server, stub):
    assert find(page, "#model-task").text == "chat"
    assert not find(page, "#form").is_displayed()  # no Predict form for an LLM
    assert find(page, "#chat-settings").is_displayed()
    assert find(page, "#chat-image-field").is_displayed()  # the card lists image and audio
    assert find(page, "#chat-audio-field").is_displayed()
    stub.card = CLASSIFIER_CARD
    try:
        page.get(server + "/")
        wait_for(page, lambda d: find(d, "#input-image"), "the classifier's inputs")
        assert find(page, "#model-task").text.startswith("classification")
        assert find(page, "#form").is_displayed() and find(page, "#predict").is_enabled()
        assert not find(page, "#chat").is_displayed()
        assert not find(page, "#chat-settings").is_displayed()
    finally:
        stub.card = None
        page.get(server + "/")
        wait_for(page, lambda d: find(d, "#chat").is_displayed(), "the Chat panel again")


def test_an_answer_streams_in_and_shows_its_usage(page, stub):
    from selenium.webdriver.common.keys import Keys

    set_field(page, "#chat-system", "Be brief.")
    set_field(page, "#chat-temperature", "0.3")
    set_field(page, "#chat-max-tokens", "40")
    box = find(page, "#chat-input")
    before = len(stub.requests)
    box.send_keys("hello", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "there")  # Shift+Enter: a new line
    time.sleep(0.3)
    assert box.get_attribute("value") == "hello\nthere" and len(stub.requests) == before
    # every text the answer shows while it streams
    page.execute_script("""
        window.seen = [];
        const log = document.querySelector('#chat-log');
        new MutationObserver(() => {
          const a = [...log.querySelectorAll('.msg.assistant .text')].pop();
          const text = a && a.textContent;
          if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(log, {subtree: true, childList: true, characterData: true});
    """)  # fmt: skip
    box.send_keys(Keys.ENTER)
    answer = settle(page, stub, before)

    body, stream = stub.requests[-1], stub.streams[-1]
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello\nthere"}]  # fmt: skip
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.3 and body["max_tokens"] == 40
    assert body["model"] == find(page, "#model-id").text
    assert stub.headers[-1].get("authorization") == (f"Bearer {KEY}" if stub.api_key else None)
    assert stream.done and len(stream.deltas) >= 2
    # textContent, not Selenium's rendered .text: a random tiny model writes control characters
    final = page.execute_script("return arguments[0].textContent",
                                answer.find_element("css selector", ".text"))  # fmt: skip
    assert final.strip() == stream.text.strip() != ""
    seen = [s for s in page.execute_script("return window.seen") if s]
    assert len(seen) >= 2 and seen[-1] == stream.text  # it arrived in pieces ...
    assert all(stream.text.startswith(s) for s in seen)  # ... each a prefix of the answer
    state = "length" if stream.finish_reason == "length" else "done"
    assert answer.get_attribute("data-state") == state
    usage = answer.find_element("css selector", ".usage")
    assert usage.get_attribute("data-completion") == str(stream.usage["completion_tokens"])
    cached = stream.usage["prompt_tokens_details"]["cached_tokens"]
    assert usage.get_attribute("data-cached") == str(cached)
    assert f"({cached} cached)" in usage.text and "tokens/s" in usage.text
    assert find(page, "#chat-input").get_attribute("value") == ""
    assert find(page, "#chat-send").is_enabled() and not find(page, "#chat-stop").is_displayed()


def test_the_second_turn_sends_the_history(page, stub):
    first_answer = stub.streams[-1].text
    before = len(stub.requests)
    say(page, "and again")
    settle(page, stub, before)
    assert stub.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello\nthere"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "and again"},
    ]
    assert len(finds(page, "#chat-log .msg.user")) == 2
    assert len(finds(page, "#chat-log .msg.assistant")) == 2


def wav_bytes() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\1" * 1600)
    return out.getvalue()


def test_new_chat_then_image_and_audio_parts(page, stub, tmp_path):
    find(page, "#chat-new").click()
    assert finds(page, "#chat-log .msg") == []
    set_field(page, "#chat-system", "")
    (tmp_path / "tone.wav").write_bytes(wav_bytes())
    find(page, "#chat-image").send_keys(str(EMOJI))
    find(page, "#chat-audio").send_keys(str(tmp_path / "tone.wav"))
    wait_for(page, lambda d: len(finds(d, "#chat-previews img, #chat-previews audio")) == 2,
             "the previews of the attachments")  # fmt: skip
    before = len(stub.requests)
    say(page, "what is this?")
    settle(page, stub, before)
    image = "data:image/png;base64," + base64.b64encode(EMOJI.read_bytes()).decode()
    audio = base64.b64encode(wav_bytes()).decode()
    assert stub.requests[-1]["messages"] == [{"role": "user", "content": [  # New chat: no history
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
    ]}]  # fmt: skip
    mine = finds(page, "#chat-log .msg.user")[-1]
    assert mine.find_element("css selector", "img").get_attribute("src") == image
    assert mine.find_element("css selector", "audio").get_attribute("src").startswith("data:audio/")
    assert finds(page, "#chat-previews *") == []  # the attachments went with the message

    (tmp_path / "clip.mp3").write_bytes(b"ID3\3\0\0\0\0\0\0" + bytes(64))
    find(page, "#chat-audio").send_keys(str(tmp_path / "clip.mp3"))
    wait_for(page, lambda d: finds(d, "#chat-previews audio"), "the mp3 preview")
    before = len(stub.requests)
    say(page, "and this?")
    settle(page, stub, before)
    last = stub.requests[-1]["messages"][-1]["content"]
    assert [p["type"] for p in last] == ["text", "input_audio"]
    assert last[1]["input_audio"]["format"] == "mp3"
    assert base64.b64decode(last[1]["input_audio"]["data"]) == (tmp_path / "clip.mp3").read_bytes()


def test_stop_hangs_up_and_keeps_the_partial_answer(page, stub):
    if stub.upstream:
        pytest.skip("the tiny model answers 500 tokens before a click lands (see the docstring)")
    find(page, "#chat-new").click()
    set_field(page, "#chat-max-tokens", "500")
    before = len(stub.requests)
    say(page, "count to five hundred")
    wait_for(page, lambda d: len(stub.requests) > before and len(stub.streams[-1].deltas) >= 3,
             "a few streamed tokens")  # fmt: skip
    assert find(page, "#chat-stop").is_displayed() and not find(page, "#chat-send").is_enabled()
    find(page, "#chat-stop").click()
    stream = stub.streams[-1]
    wait_for(page, lambda d: stream.disconnected, "the server to see the hang-up", timeout=5)
    assert not stream.done and len(stream.deltas) < 500
    answer = finds(page, "#chat-log .msg.assistant")[-1]
    wait_for(page, lambda d: answer.get_attribute("data-state") == "stopped", "the stopped state")
    shown = answer.find_element("css selector", ".text").text
    assert shown and stream.text.startswith(shown)
    assert find(page, "#chat-send").is_enabled() and not find(page, "#chat-stop").is_displayed()
    n = len(stream.deltas)
    time.sleep(0.3)
    assert len(stream.deltas) == n  # nothing more was generated


def test_an_error_is_shown_in_the_conversation(page, stub):
    find(page, "#chat-new").click()
    set_field(page, "#chat-max-tokens", "0")  # refused by the server, not by the page
    before = len(stub.requests)
    say(page, "hello")
    answer = settle(page, stub, before)
    assert stub.requests[-1]["max_tokens"] == 0
    message = stub.errors[-1]["error"]["message"]
    assert answer.get_attribute("data-state") == "error"
    assert answer.find_element("css selector", ".chat-error").text == message
    assert "failed" in finds(page, "#chat-log .msg.user")[-1].get_attribute("class")
    assert find(page, "#chat-input").get_attribute("value") == "hello"  # back in the box to retry
    # the failed turn is not in the conversation: the retry sends it once
    set_field(page, "#chat-max-tokens", "20")
    before = len(stub.requests)
    find(page, "#chat-send").click()
    settle(page, stub, before)
    assert stub.requests[-1]["messages"] == [{"role": "user", "content": "hello"}]
