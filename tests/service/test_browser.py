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


def analyse(browser, server, *files: Path, age_group: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url)
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    if age_group:
        Select(browser.find_element(By.ID, "age-group")).select_by_value(age_group)
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
    caption = result.find_element(By.CSS_SELECTOR, "figure.xray figcaption").text
    assert "abnormality score" in caption and "fracture" not in caption
    assert "abnormality" in browser.title and "fracture" not in browser.title
    # the age group was not stated: the page says so and shows the short caution, no forced review
    assert result.find_element(By.CSS_SELECTOR, "[data-field=age-group]").text == "Not stated"
    caution = recommendation.find_element(By.CSS_SELECTOR, "[data-field=paediatric]")
    assert "Age group not stated" in caution.text and "Age group not given" in caution.text
    # the model's sensitivity on val with its interval, or plainly "not recorded"
    sensitivity = result.find_element(By.CSS_SELECTOR, "[data-field=sensitivity]").text
    assert ("Wilson 95% CI" in sensitivity and "abnormal val studies" in sensitivity) or (
        "Not recorded" in sensitivity
    )
    assert "Training data: The models were trained on MURA" in recommendation.text
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


def test_age_group_input_gives_a_child_the_paediatric_warnings(browser, server, good_png):
    from selenium.webdriver.common.by import By

    browser.get(server.url)
    select = browser.find_element(By.ID, "age-group")
    assert select.get_attribute("value") == "unknown"  # the default, and the page asks for it
    label = browser.find_element(By.CSS_SELECTOR, "label[for=age-group]")
    assert label.text == "Age group" and "Please state it" in browser.page_source
    analyse(browser, server, good_png, age_group="child")
    result = wait_for(browser, "article.result")
    assert result.find_element(By.CSS_SELECTOR, "[data-field=age-group]").text == "Child"
    warnings = result.find_element(By.CSS_SELECTOR, "[data-field=paediatric]").text
    assert "Child: paediatric warnings" in warnings and "Safeguarding" in warnings
    review = result.find_element(By.CSS_SELECTOR, ".review").text
    assert "the patient is a child" in review


def _is_green(css_colour: str) -> bool:
    """rgb(a) where green clearly dominates red and blue."""
    values = [float(v) for v in css_colour[css_colour.index("(") + 1 : -1].split(",")[:3]]
    red, green, blue = values
    return green > red + 25 and green > blue + 25


def test_negatives_are_never_styled_green_or_routine(browser, server):
    """The page's own style sheet on the elements a negative result renders (whatever the
    untrained models answer here): badge, probability bar and urgency banner."""
    browser.get(server.url)
    browser.execute_script(
        """
        const box = document.createElement("div");
        box.id = "probe";
        box.innerHTML =
          '<span class="badge finding-no-fracture">No abnormality detected</span>' +
          '<div class="bar"><div class="bar-fill finding-no-fracture"></div></div>' +
          '<p class="urgency urgency-clinical"></p><p class="urgency urgency-routine"></p>';
        document.body.append(box);
        """
    )
    styles = browser.execute_script(
        """
        return Array.from(document.querySelectorAll("#probe *")).map((node) => {
          const style = getComputedStyle(node);
          return [node.className, style.color, style.backgroundColor];
        });
        """
    )
    assert len(styles) == 5
    for name, colour, background in styles:
        assert not _is_green(colour) and not _is_green(background), (name, colour, background)
    script = browser.execute_script("return fetch('/static/app.js').then((r) => r.text())")
    assert "urgency_label" in script  # the banner says who sets the urgency, not "ROUTINE"
