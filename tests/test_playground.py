"""The browser playground at ``GET /``: a real ``modalforge serve`` process driven by headless
Chromium through Selenium (skipped only where chromium / chromedriver are not installed)."""

import shutil
from pathlib import Path

import httpx
import pytest

from .conftest import COLORS, png_bytes
from .serving import running_server, train_toy_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver)",
)

KEY = "open-sesame"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny image + text classifier, both inputs optional; the class is the image colour."""
    return train_toy_bundle(tmp_path_factory.mktemp("playground"), inputs=("image", "text"))


@pytest.fixture(scope="module")
def server(bundle):
    """`modalforge serve --api-key KEY` in its own process on 127.0.0.1; yields its URL."""
    with running_server(bundle, "--api-key", KEY) as (url, _):
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


def text_of(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).text.strip()


def api_predict(url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files={"image": ("x.png", image, "image/png")},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def page(server, browser):
    """The playground, opened and unlocked with the API key (it asks for it on a 401)."""
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    note = wait_for(browser, lambda d: d.find_element(By.ID, "auth-note").is_displayed()
                    and d.find_element(By.ID, "auth-note"), "the API-key notice")  # fmt: skip
    assert "API key" in note.text
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()  # the key panel opens by itself
    key.send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait_for(browser, lambda d: text_of(d, "#model-id"), "the model card")
    assert browser.execute_script("return localStorage.getItem('modalforge.apiKey')") == KEY
    return browser


def test_playground_predicts_like_the_api(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    assert text_of(page, "#model-id") == "toy"
    assert text_of(page, "#model-task").startswith("classification")
    assert not page.find_element(By.ID, "auth-note").is_displayed()
    for column in ("image", "text"):
        assert page.find_element(By.ID, f"input-{column}").get_attribute("aria-required") is None
    assert page.find_element(By.ID, "input-image").get_attribute("accept") == "image/*"

    red = png_bytes((30, 30), COLORS["r"])
    (tmp_path / "red.png").write_bytes(red)
    expected = api_predict(server, red)
    assert expected.status_code == 200, expected.text
    expected = expected.json()

    page.find_element(By.ID, "input-image").send_keys(str(tmp_path / "red.png"))
    assert page.find_element(By.CSS_SELECTOR, "img.preview").is_displayed()
    page.find_element(By.ID, "predict").click()
    label = wait_for(page, lambda d: text_of(d, "#result-label"), "a prediction")
    assert label == expected["label"] == "r"

    bars = page.find_elements(By.CSS_SELECTOR, "#probabilities [data-label]")
    assert bars[0].get_attribute("data-label") == expected["label"]  # top first
    assert sorted(b.get_attribute("data-label") for b in bars) == ["b", "g", "r"]
    probs = {b.get_attribute("data-label"): float(b.get_attribute("data-prob")) for b in bars}
    assert probs == pytest.approx(expected["probabilities"], abs=1e-6)
    rows = page.find_elements(By.CSS_SELECTOR, "#contributions [data-column]")
    contributions = {r.get_attribute("data-column"): r.text for r in rows}
    assert set(contributions) == {"image", "text"} and "missing" in contributions["text"]
    assert not page.find_element(By.ID, "error").is_displayed()
    page.save_screenshot(str(tmp_path / "playground.png"))


def test_playground_predicts_an_uploaded_emoji(page, server):
    """A real emoji (tests/data) with its name typed in: the page shows the API's answer."""
    from selenium.webdriver.common.by import By

    emoji = Path(__file__).parent / "data" / "emoji_1f600.png"
    expected = httpx.post(
        f"{server}/v1/predict", files={"image": ("e.png", emoji.read_bytes(), "image/png")},
        data={"text": "grinning face"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
    )  # fmt: skip
    assert expected.status_code == 200, expected.text
    image = page.find_element(By.ID, "input-image")
    image.clear()
    image.send_keys(str(emoji))
    text = page.find_element(By.ID, "input-text")
    text.clear()
    text.send_keys("grinning face")
    page.find_element(By.ID, "predict").click()
    wait_for(page, lambda d: "from image, text" in text_of(d, "#result-meta"), "the prediction")
    assert text_of(page, "#result-label") == expected.json()["label"]


def test_playground_shows_the_servers_error(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    broken = png_bytes((30, 30), COLORS["g"])[:40]  # a truncated PNG
    (tmp_path / "broken.png").write_bytes(broken)
    answer = api_predict(server, broken)
    assert answer.status_code == 422
    message = answer.json()["error"]["message"]

    image = page.find_element(By.ID, "input-image")
    image.clear()
    image.send_keys(str(tmp_path / "broken.png"))
    page.find_element(By.ID, "predict").click()
    error = wait_for(page, lambda d: text_of(d, "#error"), "the error box")
    assert message in error
    assert not page.find_element(By.ID, "result").is_displayed()


def test_playground_shows_a_captioning_bundles_caption(browser, tmp_path):
    """A captioning bundle in the same page: the headline is the caption, no contributions."""
    import pandas as pd
    from selenium.webdriver.common.by import By

    from modalforge.caption import CaptionPredictor
    from modalforge.models import EncoderSpec
    from modalforge.predictor import FitConfig
    from modalforge.train.module import OptimConfig

    rows = []
    for i in range(30):
        c = "rgb"[i % 3]
        (tmp_path / f"{i}.png").write_bytes(png_bytes((30, 30), COLORS[c]))
        rows.append({"image": f"{i}.png", "text": {"r": "a red apple", "g": "a green leaf",
                                                   "b": "the blue sea"}[c]})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    spec = EncoderSpec("cnn", {"widths": (8, 16), "depth": 1, "image_size": 30}, "frozen")
    p = CaptionPredictor("image", "text", spec, dim=32, layers=1, heads=2, dropout=0.0,
                         max_length=6, cache_dir=tmp_path / "cache",
                         fit_config=FitConfig(epochs=20, batch_size=10, patience=20,
                                              optim=OptimConfig(lr=3e-3, warmup_ratio=0.0)))  # fmt: skip
    p.fit(tmp_path / "m.csv", out_dir=tmp_path / "run", progress=False)
    bundle = p.save(tmp_path / "captioner").path
    with running_server(bundle) as (url, _):
        image = tmp_path / "1.png"  # green
        expected = httpx.post(f"{url}/v1/predict", timeout=30,
                              files={"image": ("g.png", image.read_bytes(), "image/png")})  # fmt: skip
        assert expected.status_code == 200, expected.text
        browser.get(url + "/")
        wait_for(browser, lambda d: text_of(d, "#model-id"), "the model card")
        browser.find_element(By.ID, "input-image").send_keys(str(image))
        browser.find_element(By.ID, "predict").click()
        wait_for(browser, lambda d: "from image" in text_of(d, "#result-meta"), "the caption")
        assert text_of(browser, "#result-label") == expected.json()["caption"]
        assert text_of(browser, "#result-confidence") == "caption"
        assert not browser.find_element(By.ID, "contrib-section").is_displayed()
