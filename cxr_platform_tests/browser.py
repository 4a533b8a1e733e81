"""The Dagster UI as a person meets it: ``dagster dev`` on a free port, Debian's chromium driven
through its own chromedriver (no driver download at test time; Selenium Manager stays off)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By

from cxr_platform.ports import free_port
from cxr_platform_tests.servers import stop_process_group

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parents[1]


def require_chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )


def screenshot_folder(
    name: str = "cxr-dagster-ui-screenshots", variable: str = "CXR_UI_SCREENSHOTS"
) -> Path:
    """``$variable``, else one fixed folder ``name`` under the temp dir, emptied per run."""
    folder = Path(os.environ.get(variable) or Path(tempfile.gettempdir()) / name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None  # the UI re-rendered what we were reading: read it again
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@contextlib.contextmanager
def dagster_dev(env: dict[str, str], log: Path) -> Iterator[str]:
    """``dagster dev -w workspace.yaml`` (webserver, daemon, code server) over the instance in
    ``env['DAGSTER_HOME']``; yields the UI's base URL."""
    port = free_port()
    dagster = Path(sys.executable).with_name("dagster")
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its webserver, daemon and code server go down together
        )
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"dagster dev exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/server_info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(answering, 180, "dagster dev to answer")
        yield base
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def chromium(
    width: int = 1600, height: int = 2400, arguments: tuple[str, ...] = ()
) -> Iterator[object]:
    """A headless chromium; a tall window so long lists render without scrolling.
    ``arguments``: more of chromium's command-line switches."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        *arguments,
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def click_button(driver, label: str, timeout_s: float) -> None:
    """Click the button a person would, by its label, once the UI has settled enough to take
    the click (React may replace it between finding and clicking)."""

    def clicked() -> bool:
        for button in driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']"):
            try:
                button.click()
            except (StaleElementReferenceException, ElementClickInterceptedException):
                return False
            return True
        return False

    wait_for(clicked, timeout_s, f"the {label!r} button")
