"""The upload page in headless Chromium (Debian's chromium + chromium-driver), against the real
service: choose a file, see the body part, finding, recommendation and disclaimer; a bad file
shows its error; the page works from the keyboard."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bonefrac import DISCLAIMER

from .conftest import PARTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = Path("/tmp/bonefrac-upload-page.png")
WAIT_S = 120


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Chromium: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1280,1700",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def analyse(browser, server, *files: Path):
    from selenium.webdriver.common.by import By

    browser.get(server.url)
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    browser.find_element(By.ID, "analyse").click()


def wait_for(browser, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, css))
    )


def test_upload_shows_part_finding_recommendation_and_disclaimer(browser, server, good_png):
    from selenium.webdriver.common.by import By

    analyse(browser, server, good_png)
    result = wait_for(browser, "article.result")
    body_part = result.find_element(By.CSS_SELECTOR, "[data-field=body-part]").text.lower()
    assert any(part in body_part for part in PARTS)
    finding = result.find_element(By.CSS_SELECTOR, "[data-field=finding] .badge")
    assert finding.get_attribute("data-finding") in {"fracture", "no_fracture", "uncertain"}
    labels = {
        "fracture": "Abnormality suspected (fracture, hardware, degenerative change, …)",
        "no_fracture": "No abnormality detected",
        "uncertain": "Uncertain",
    }
    assert finding.text.strip() == labels[finding.get_attribute("data-finding")]
    assert result.find_element(By.CSS_SELECTOR, ".bar[role=meter]").get_attribute("aria-valuenow")
    recommendation = result.find_element(By.CSS_SELECTOR, "section.recommendation")
    assert recommendation.find_element(By.CSS_SELECTOR, ".urgency").text.strip()
    assert recommendation.find_elements(By.CSS_SELECTOR, "ol.sources li")
    draft = recommendation.find_element(By.CSS_SELECTOR, "[data-field=draft]")  # draft allowed
    assert draft.is_displayed() and "DRAFT" in draft.text
    assert "What the model detects" in recommendation.text
    assert result.find_element(By.CSS_SELECTOR, "figure.xray img").get_attribute("src")
    assert "SYNTHETIC" in result.text
    assert DISCLAIMER in browser.find_element(By.ID, "disclaimer").text
    assert DISCLAIMER in result.find_element(By.CSS_SELECTOR, ".result-disclaimer").text
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SCREENSHOT))  # for a person to look at


def test_study_of_several_files_shows_each_image(browser, server, study_pngs):
    from selenium.webdriver.common.by import By

    analyse(browser, server, *study_pngs)
    result = wait_for(browser, "article.result")
    assert "Study of 3 images" in result.text
    assert len(result.find_elements(By.CSS_SELECTOR, ".image-card")) == 3


def test_bad_file_shows_its_error(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.png"
    bad.write_text("not an X-ray")
    analyse(browser, server, bad)
    error = wait_for(browser, ".error")
    assert "notes.png" in error.text and "not a PNG, JPEG or DICOM image" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "article.result")
    assert DISCLAIMER in browser.find_element(By.ID, "disclaimer").text


def test_page_is_usable_from_the_keyboard(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)  # the skip link comes first
    assert browser.switch_to.active_element.get_attribute("class") == "skip-link"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "files"
    labels = {
        el.get_attribute("for") for el in browser.find_elements(By.CSS_SELECTOR, "label[for]")
    }
    assert "files" in labels
    analyse_button = browser.find_element(By.ID, "analyse")
    assert analyse_button.tag_name == "button" and analyse_button.get_attribute("type") == "submit"
    # Enter on the form with no file chosen explains what to do instead of failing silently.
    analyse_button.send_keys(Keys.ENTER)
    assert "Choose one or more X-ray files" in wait_for(browser, ".error").text
