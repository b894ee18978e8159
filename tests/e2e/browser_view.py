"""Open a task's labeling view in Label Studio with headless Chromium and record what a person sees.

Runs inside the e2e tool environment (it imports Playwright, which the project's environment does not
have), as `python browser_view.py '<json arguments>'`. It drives the browser only; the test that runs it
makes the assertions. Arguments (JSON): chromium (the browser binary), url, email, password, project,
tasks (a list of {task, regions: how many regions to wait for, out: a folder}), result (JSON path).

For each task it writes PNGs into its `out`: labeling-view.png (the page), stage-shown.png (the image area
with all regions), stage-hidden.png (after the regions panel's "Hide all regions") and stage-region-<i>.png
(only the i-th listed region shown again with its eye button): one region at a time, so overlapping masks
can be told apart.

The result JSON, one entry per task: {"task", "regions": [{"type", "label", "score"}],
"stage": {"x", "y", "width", "height"}, "image": {"natural_width", "natural_height"}}.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, ViewportSize, sync_playwright

# Debian's Chromium, headless, with nothing that phones home or updates itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}
TIMEOUT_MS = 60_000
SETTLE_TIMEOUT_S = 30.0

REGION_ITEMS = ".lsf-outliner .lsf-tree__node"
HIDE_ALL = "button[aria-label='Hide all regions']"
REGION_EYE = ".lsf-outliner-item__control_type_visibility button"  # shown on hover
STAGE = ".konvajs-content"  # the canvases the image and regions are painted on


def log_in(page: Page, url: str, email: str, password: str) -> None:
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    if "/user/login" in page.url:
        raise RuntimeError(f"login refused; still on {page.url}")


def wait_for_image(page: Page) -> dict[str, int]:
    """Until the task image is decoded: its natural size, read in the same evaluation that found it decoded (the
    editor may re-render the element between two separate calls)."""
    found = page.wait_for_function(
        "() => { const i = document.querySelector('img[alt=image]');"
        " return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null; }",
        timeout=TIMEOUT_MS,
    )
    size = found.json_value()
    return {"natural_width": int(size[0]), "natural_height": int(size[1])}


def read_regions(page: Page) -> list[dict[str, Any]]:
    """The regions panel (outliner) as listed: region type, label text, score text."""
    return page.eval_on_selector_all(
        REGION_ITEMS,
        """items => items.map(item => ({
            type: [...item.classList].find(c => c.startsWith('lsf-tree__node_type_'))?.slice(20) ?? '',
            label: item.querySelector('.lsf-outliner-item__title')?.innerText.trim() ?? '',
            score: item.querySelector('.lsf-outliner-item__control_type_score')?.innerText.trim() ?? '',
        }))""",
    )


def wait_until_painted(page: Page, path: Path) -> None:
    """Until two stage screenshots 0.5 s apart are identical (masks decode and paint asynchronously)."""
    started = time.monotonic()
    previous = b""
    while time.monotonic() - started < SETTLE_TIMEOUT_S:
        page.wait_for_timeout(500)
        current = page.locator(STAGE).first.screenshot(path=str(path))
        if current == previous:
            return
        previous = current
    raise RuntimeError(f"the canvas kept changing for {SETTLE_TIMEOUT_S:.0f} s")


def toggle_region(page: Page, index: int) -> None:
    """Click the eye button of the index-th region in the regions panel."""
    item = page.locator(REGION_ITEMS).nth(index)
    item.hover()
    item.locator(REGION_EYE).click()
    page.mouse.move(0, 0)  # hovering a listed region highlights it on the canvas


def capture_task(page: Page, url: str, project: int, task: int, regions: int, out: Path) -> dict[str, Any]:
    """Open one task's labeling view, wait for its image and `regions` regions, and capture it into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    page.goto(f"{url}/projects/{project}/data?task={task}")
    image = wait_for_image(page)
    page.wait_for_function(f"n => document.querySelectorAll('{REGION_ITEMS}').length >= n", arg=regions)
    wait_until_painted(page, out / "stage-shown.png")
    page.screenshot(path=str(out / "labeling-view.png"))
    listed = read_regions(page)
    report = {"task": task, "regions": listed, "stage": page.locator(STAGE).first.bounding_box(), "image": image}
    page.click(HIDE_ALL)
    wait_until_painted(page, out / "stage-hidden.png")
    for index in range(len(listed)):
        toggle_region(page, index)
        wait_until_painted(page, out / f"stage-region-{index}.png")
        toggle_region(page, index)
    return report


@contextmanager
def logged_in_page(args: dict[str, Any]) -> Iterator[Page]:
    """A page of Debian's Chromium, headless, logged in to Label Studio (args: chromium, url, email, password);
    the browser is closed after."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args["chromium"], args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            page.set_default_timeout(TIMEOUT_MS)
            log_in(page, args["url"], args["email"], args["password"])
            yield page
        finally:
            browser.close()


def main(args: dict[str, Any]) -> None:
    with logged_in_page(args) as page:
        reports = [
            capture_task(page, args["url"], args["project"], item["task"], item["regions"], Path(item["out"]))
            for item in args["tasks"]
        ]
    Path(args["result"]).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
