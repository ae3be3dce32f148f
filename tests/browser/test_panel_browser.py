"""The panel in a real browser: Debian's chromium, driven by Selenium through chromium-driver,
against tests/ui_app.py (the real gradio of the venv it runs in, the WebUI stand-ins). Tick a
technique, move sliders, pick a preset, paste an infotext, the speed stack, reset: the summary, the panel's label,
the controls and the schedule preview must follow. Runs in .venv-gradio3 / .venv-gradio4 via
dev/test-ui.sh; skipped where gradio, selenium or chromium is missing. UNETMODS_SCREENSHOT=path
saves a picture of the panel with its preview there."""
from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gr = pytest.importorskip("gradio")
if "lab/hosts/webui" in gr.__file__.replace(os.sep, "/") or not hasattr(gr, "Blocks"):
    pytest.skip("needs the real gradio (dev/test-ui.sh)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("UNETMODS_REQUIRE_BROWSER"):  # CI installs them: a missing browser is a failure there
        raise RuntimeError(f"UNETMODS_REQUIRE_BROWSER is set but {CHROMIUM} or {DRIVER} is missing")
    pytest.skip("needs Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

import ui_app  # noqa: E402

from lib_unetmods.stacks import stack_settings  # noqa: E402
from lib_unetmods.techniques import SPECS  # noqa: E402
from lib_unetmods.unet_map import SD1  # noqa: E402

ELEM = "script_txt2img_unet_mods_"
TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page():
    app = ui_app.build_app("sd15")[0]
    port = free_port()
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, ELEM + "panel"))
        yield driver
    finally:
        driver.quit()
        # gradio 3's close() joins its (daemon) server thread, which can wait forever on a browser
        # connection uvicorn keeps open: give it a while, then let the process end without it
        closer = threading.Thread(target=app.close, daemon=True)
        closer.start()
        closer.join(timeout=20)


# --- helpers that work on gradio 3's and gradio 4's DOM ----------------------------------

def wait_for(driver, condition, message):
    try:
        # the preview's HTML is replaced on every update: a row read while it is swapped is stale
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: condition())
    except Exception:
        shot = os.path.join(tempfile.gettempdir(), "unetmods-browser-failure.png")
        driver.save_screenshot(shot)
        raise AssertionError(f"timed out waiting for: {message} (page: {shot})") from None


def element(driver, elem_id):
    return driver.find_element(By.ID, elem_id)


def open_accordion(driver, elem_id):
    """Click the accordion's header unless its content is already shown."""
    acc = element(driver, elem_id)
    header = acc.find_element(By.CSS_SELECTOR, ".label-wrap")
    if "open" not in (header.get_attribute("class") or "").split():
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", header)
        header.click()
    wait_for(driver, lambda: "open" in header.get_attribute("class").split(), f"{elem_id} opens")


def close_accordion(driver, elem_id):
    header = element(driver, elem_id).find_element(By.CSS_SELECTOR, ".label-wrap")
    if "open" in (header.get_attribute("class") or "").split():
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", header)
        header.click()


def paste(driver, line):
    text = element(driver, "paste_text").find_element(By.CSS_SELECTOR, "textarea")
    text.clear()
    text.send_keys(line)
    element(driver, "paste_button").click()


def take_screenshot(driver, path):
    """The README's picture: a few techniques at 1024x1024 with hires fix, accordions closed."""
    paste(driver, "UNetMods tome v1: default, UNetMods deepcache v1: default, UNetMods scalecrafter v1: default, "
                  "UNetMods freeu v1: start=0.2")
    wait_for(driver, lambda: "On: Token Merging (ToMe), DeepCache, ScaleCrafter, FreeU" in summary_text(driver),
             "summary of the screenshot's techniques")
    wait_for(driver, lambda: any("um-dilate" in cells(r) for r in preview_rows(driver, "scalecrafter")), "dilation rows")
    for tid in SPECS:
        close_accordion(driver, ELEM + tid)
    driver.set_window_size(1000, 2400)
    time.sleep(1)  # let the layout settle at the new width
    element(driver, ELEM + "panel").screenshot(path)
    driver.set_window_size(1280, 2400)


def tick(driver, elem_id, on=True):
    box = element(driver, elem_id).find_element(By.CSS_SELECTOR, "input[type=checkbox]")
    if box.is_selected() != on:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()


def set_number(driver, elem_id, value):
    """Type into the slider's number box and leave it (enter + tab), as a user does."""
    box = element(driver, elem_id).find_element(By.CSS_SELECTOR, "input[type=number]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER, Keys.TAB)


def drag_slider(driver, elem_id, fraction):
    """Move the range input like a mouse drag: arrow keys from its current position."""
    rng = element(driver, elem_id).find_element(By.CSS_SELECTOR, "input[type=range]")
    lo, hi, step = (float(rng.get_attribute(a)) for a in ("min", "max", "step"))
    current = float(rng.get_attribute("value"))
    target = lo + fraction * (hi - lo)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", rng)
    rng.click()
    current = float(rng.get_attribute("value"))
    key = Keys.ARROW_RIGHT if target > current else Keys.ARROW_LEFT
    rng.send_keys(*[key] * int(round(abs(target - current) / step)))
    return float(rng.get_attribute("value"))


def number_value(driver, elem_id):
    return float(element(driver, elem_id).find_element(By.CSS_SELECTOR, "input[type=number]").get_attribute("value"))


def choose(driver, elem_id, option):
    box = element(driver, elem_id).find_element(By.CSS_SELECTOR, "input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    item = wait_for(driver, lambda: next((li for li in driver.find_elements(By.CSS_SELECTOR, "ul.options li")
                                          if li.text.strip() == option), None), f"option {option}")
    item.click()


def summary_text(driver):
    return element(driver, ELEM + "summary").text


def panel_label(driver):
    return element(driver, ELEM + "panel").find_element(By.CSS_SELECTOR, ".label-wrap").text


def preview_rows(driver, technique):
    return element(driver, ELEM + "preview").find_elements(By.CSS_SELECTOR, f'.um-row[data-technique="{technique}"]')


def cells(row):
    return [c.get_attribute("class") for c in row.find_elements(By.CSS_SELECTOR, ".um-steps i")]


def first_pass_row(driver, technique):
    rows = [r for r in element(driver, ELEM + "preview").find_elements(By.CSS_SELECTOR, '.um-pass[data-pass="first pass"] .um-row')
            if r.get_attribute("data-technique") == technique]
    return rows[0] if rows else None


# --- the user's session ------------------------------------------------------------------

def test_tick_move_preset_paste_reset(page):
    d = page
    open_accordion(d, ELEM + "panel")
    assert "All techniques off" in summary_text(d)
    assert "No technique acts" in element(d, ELEM + "preview").text

    # tick DeepCache: summary, the panel's label and the preview follow
    tick(d, ELEM + "deepcache-checkbox")
    wait_for(d, lambda: "On: DeepCache" in summary_text(d), "summary names DeepCache")
    wait_for(d, lambda: "On: DeepCache" in panel_label(d), "panel label names DeepCache")
    wait_for(d, lambda: first_pass_row(d, "deepcache") is not None and len(cells(first_pass_row(d, "deepcache"))) == 20,
             "DeepCache row with 20 steps")
    assert cells(first_pass_row(d, "deepcache")).count("um-full") == math.ceil(20 / 3)

    # move the WebUI's steps slider, then DeepCache's interval slider
    steps = drag_slider(d, "txt2img_steps", 29 / 149)
    assert steps != 20
    wait_for(d, lambda: len(cells(first_pass_row(d, "deepcache"))) == int(steps), f"{steps:g} cells")
    open_accordion(d, ELEM + "deepcache")
    set_number(d, ELEM + "deepcache_interval", 5)
    wait_for(d, lambda: cells(first_pass_row(d, "deepcache")).count("um-full") == math.ceil(steps / 5),
             "full steps every 5")

    # ScaleCrafter at 1024x1024 with hires fix: dilated rows in both passes
    set_number(d, "txt2img_width", 1024)
    set_number(d, "txt2img_height", 1024)
    tick(d, ELEM + "scalecrafter-checkbox")
    wait_for(d, lambda: any("um-dilate" in cells(r) for r in preview_rows(d, "scalecrafter")), "ScaleCrafter dilates")
    tick(d, "txt2img_hr-checkbox")
    wait_for(d, lambda: d.find_elements(By.CSS_SELECTOR, f'#{ELEM}preview .um-pass[data-pass="hires pass"]'), "hires pass")
    wait_for(d, lambda: "DeepCache, ScaleCrafter" in summary_text(d), "summary names both")

    # a preset: Deep Shrink's wcde fills its controls (block 1, second window)
    tick(d, ELEM + "deepshrink-checkbox")
    open_accordion(d, ELEM + "deepshrink")
    choose(d, ELEM + "deepshrink_preset", "wcde")
    wait_for(d, lambda: number_value(d, ELEM + "deepshrink_block") == 1, "block 1 from the preset")
    wait_for(d, lambda: "Deep Shrink" in element(d, ELEM + "preview").text, "Deep Shrink (or its rule) in the preview")

    # paste an infotext: the controls, the summary and the preview change
    paste(d, "Steps: 30, Size: 1024x1024, UNetMods freeu v1: b1=1.3 start=0.5, "
             "UNetMods deepcache v1: interval=2, UNetMods hidiffusion v1: msw_msa=false")
    wait_for(d, lambda: "On: DeepCache, HiDiffusion, FreeU" in summary_text(d), "summary after paste")
    wait_for(d, lambda: number_value(d, ELEM + "deepcache_interval") == 2, "interval from the paste")
    wait_for(d, lambda: first_pass_row(d, "freeu") is not None
             and cells(first_pass_row(d, "freeu")).count("um-off") == int(int(steps) * 0.5), "FreeU from half-way")
    assert not preview_rows(d, "scalecrafter"), "ScaleCrafter is off after the paste"
    shot = os.environ.get("UNETMODS_SCREENSHOT")
    if shot:
        take_screenshot(d, shot)

    # the speed stack (the app's model is SD1): DeepCache + HiDiffusion, FreeU back off
    interval = stack_settings("fast", SD1)["deepcache"]["interval"]
    element(d, ELEM + "stack_fast").click()
    wait_for(d, lambda: "On: DeepCache, HiDiffusion" in summary_text(d) and "FreeU" not in summary_text(d),
             "summary after the stack button")
    wait_for(d, lambda: number_value(d, ELEM + "deepcache_interval") == interval, f"interval {interval} from the stack")

    # reset all
    element(d, ELEM + "reset").click()
    wait_for(d, lambda: "All techniques off" in summary_text(d), "summary after reset")
    wait_for(d, lambda: "No technique acts" in element(d, ELEM + "preview").text, "empty preview after reset")
    assert number_value(d, ELEM + "deepcache_interval") == 3
    assert panel_label(d).strip().startswith("UNet Mods") and "On:" not in panel_label(d)
