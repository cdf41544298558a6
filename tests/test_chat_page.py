"""The chat page (nanogpt/chat_page.html, served by serve.py at /) in a real headless Chromium driven by Selenium:
type, send, the reply streams in pieces and equals a cache-free greedy decode, a second turn sees the first, the
sampling settings reach the server, Stop ends a reply, and an error shows as a line on the page.

Needs Debian's chromium and chromium-driver (apt) and selenium (pip); .ci/run installs them. With
SCREENSHOT=docs/chat_page.png the conversation is also saved as a PNG (how the README's picture was made)."""
import os
import shutil
import tempfile

import pytest
import requests
from test_serve import chat_reference, save_run, start_server, tiny_chat_model

from nanogpt.tokenizer import Tokenizer, chat_spec

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (CI installs it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHAT = Tokenizer(chat_spec())


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
                    "(CI installs them)")
    model = tiny_chat_model(block_size=1024)  # a long reply takes seconds: time to press Stop
    proc, url = start_server(save_run(tmp_path_factory.mktemp("page"), model), "--slots=2")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,760", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(url + "/")
        yield model, driver, url
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def setting(driver, name, value):
    field = driver.find_element(By.ID, name)
    field.clear()
    field.send_keys(str(value))


def last_message(driver):
    messages = driver.find_elements(By.CSS_SELECTOR, ".msg")
    return messages[-1] if messages else None


def say(driver, text):
    """Type a message, press Enter, wait until the reply is complete; returns the last bubble (the reply or an
    error line)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg"))
    driver.find_element(By.ID, "prompt").send_keys(text + "\n")
    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
               and len(d.find_elements(By.CSS_SELECTOR, ".msg")) == before + 2)
    return last_message(driver)


def test_a_conversation_streams_in_the_browser(page):
    model, driver, _ = page
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "run")
    setting(driver, "temperature", 0)
    setting(driver, "max_tokens", 12)
    first = say(driver, "Hello, who are you?")
    expected = chat_reference(model, [{"role": "user", "content": "Hello, who are you?"}], 12)
    assert first.get_attribute("class") == "msg assistant"
    assert first.get_attribute("textContent") == expected
    assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces, shown as they came
    assert first.get_attribute("data-finish") == "length"
    setting(driver, "max_tokens", 5)  # the settings go with each request
    second = say(driver, "And then?")
    conversation = [{"role": "user", "content": "Hello, who are you?"}, {"role": "assistant", "content": expected},
                    {"role": "user", "content": "And then?"}]
    assert second.get_attribute("textContent") == chat_reference(model, conversation, 5)  # it saw the first turn
    if os.environ.get("SCREENSHOT"):
        driver.save_screenshot(os.environ["SCREENSHOT"])


def test_stop_and_errors_show_on_the_page(page):
    _, driver, url = page
    driver.find_element(By.ID, "reset").click()
    setting(driver, "max_tokens", 100000)  # over the server's limit: its 400 message shows as an error line
    error = say(driver, "Hi")
    assert error.get_attribute("class") == "msg error" and "max_tokens 100000" in error.text
    setting(driver, "max_tokens", 4000)  # a long reply, stopped from the page: the server frees the slot
    before = requests.get(f"{url}/health").json()["cancelled"]
    driver.find_element(By.ID, "prompt").send_keys("Talk for a long time\n")
    WebDriverWait(driver, 30, poll_frequency=0.02).until(
        lambda d: int(last_message(d).get_attribute("data-chunks") or 0) > 0)
    driver.find_element(By.ID, "stop").click()
    WebDriverWait(driver, 30).until(lambda d: requests.get(f"{url}/health").json()["cancelled"] == before + 1)
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
