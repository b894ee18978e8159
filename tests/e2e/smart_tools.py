"""Use Label Studio's smart tools on one task of label_config/interactive.xml in headless Chromium, as an annotator.

Runs inside the e2e tool environment (it imports Playwright), as `python smart_tools.py '<json arguments>'`, like
browser_view.py. It drives the browser and records; the test that runs it makes the assertions. Arguments (JSON):
chromium, url, email, password, project, task, image ({width, height} as displayed), click and negative (a point
in percent of the image: [x, y]), box (two corners in percent: [[x1, y1], [x2, y2]]), prompt (text for the TextArea),
out (a folder), result (JSON path).

Label Studio 1.23's editor, as read in its frontend (libs/editor, libs/ui) and tried:
- the Auto-Annotation toggle is in the editor's bottom bar (data-testid bottombar-auto-annotation-toggle); it is
  shown when the project has an interactive ML backend and turns on the smart tools: an "Auto-Detect" toolbar
  button whose hover menu holds one smart tool per tool kind (the key-point-tool and rectangle-tool in it);
- a smart tool draws with the selected label of its own control: the label bars follow the config's order
  (mask, click, box), so the n-th `.lsf-labels` bar is the n-th labels control;
- what the backend answers comes back as suggestions ("N suggestions" with accept/reject buttons in the bottom
  bar), painted on the canvas but not listed in the regions panel until accepted; accepting them also deletes the
  smart keypoints and boxes, so a next click starts a new object. While they are suggestions, another click on the
  same label (alt+click: a negative point) sends all of that label's smart keypoints and replaces them. A label
  is unselected after each region drawn (the editor's default), so it is selected again before each click;
- a smart rectangle is sent with the rectangles of its label accepted before, the one drawn last;
- typed text goes in the TextArea and is sent when submitted (its Add button);
- a project whose "Use predictions to prelabel tasks" is on shows a whole prediction when the task opens: its
  regions then take the clicks meant for the image (the test turns it off).

Steps, each recorded as {name, request (the context sent to /api/ml/<id>/interactive-annotating), answer (Label
Studio's JSON answer), suggestions (the bottom bar's count), regions (the regions panel: type, label, score),
accepted (the regions panel after accepting, for steps whose answer was accepted)}; PNGs in `out`:
<step>-before.png (the stage just before the step, regions hidden), <step>-stage.png (after it, the canvas
settled), <step>-page.png (the whole page), <step>-accepted.png (the page after accepting), last-page.png.
The result JSON: {"steps": [...], "error": null or why the session stopped, "stage": the stage's box on the page,
"image": the image's natural size}.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, its folder is on sys.path: browser_view is its sibling there.
from browser_view import (
    HIDE_ALL,
    STAGE,
    logged_in_page,
    read_regions,
    wait_for_image,
    wait_until_painted,
)
from playwright.sync_api import Page

AUTO_ANNOTATION = "bottombar-auto-annotation-toggle"  # data-testid of the toggle's checkbox
AUTO_DETECT = "button.lsf-tool_smart:not([aria-label])"  # the toolbar's smart-tools button
SMART_TOOL = ".lsf-tool__extra button.lsf-tool_smart[aria-label={}]"  # one smart tool in its hover menu
LABEL_BARS = ".lsf-labels"
CONTROLS = ("mask", "click", "box")  # interactive.xml's labels controls, in the order their bars are shown
SUGGESTIONS = ".lsf-auto-accept__info"
SPINNER = ".lsf-auto-accept__spinner"
ACCEPT = "bottombar-accept-suggestions-button"
INTERACTIVE = re.compile(r"/api/ml/\d+/interactive-annotating")
FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"  # two paints
ANSWER_TIMEOUT_MS = 240_000  # a click on a loaded 2-core machine: the backend's queue, worker and models


class Editor:
    """The labeling editor of one task, with what the image area's geometry needs to turn percent into the page."""

    def __init__(self, page: Page, out: Path, image: dict[str, int]) -> None:
        self.page, self.out, self.image = page, out, image
        self.steps: list[dict[str, Any]] = []

    def point(self, x: float, y: float) -> tuple[float, float]:
        """A point in percent of the image as page coordinates (the image is fitted top-left in the stage)."""
        stage = self.page.locator(STAGE).first.bounding_box()
        assert stage is not None, "the stage is not shown"
        scale = min(stage["width"] / self.image["width"], stage["height"] / self.image["height"])
        return stage["x"] + x / 100 * self.image["width"] * scale, stage["y"] + y / 100 * self.image["height"] * scale

    def turn_on_auto_annotation(self) -> None:
        toggle = self.page.get_by_test_id(AUTO_ANNOTATION)
        toggle.check(force=True)  # the checkbox is drawn over by the toggle's indicator
        self.page.wait_for_selector(AUTO_DETECT)

    def pick(self, tool: str, control: str, label: str) -> None:
        """Pick a smart tool from Auto-Detect's menu, then `label` of `control` (one of CONTROLS)."""
        self.page.hover(AUTO_DETECT)
        self.page.click(SMART_TOOL.format(tool))
        self.select_label(control, label)
        self.page.wait_for_selector(f"{SMART_TOOL.format(tool)}.lsf-tool_active", state="attached")

    def select_label(self, control: str, label: str) -> None:
        """Select `label` of `control` (one of CONTROLS). Label Studio unselects it after each region drawn
        (unless the "keep label selected" setting is on), so each click needs it again, as for an annotator."""
        chip = self.page.locator(LABEL_BARS).nth(CONTROLS.index(control)).locator(".lsf-label", has_text=label)
        chip.click()
        self.page.wait_for_function("chip => chip.classList.contains('lsf-label_selected')", arg=chip.element_handle())
        self.page.mouse.move(0, 0)

    def step(self, name: str, act: Callable[[], None]) -> dict[str, Any]:
        """Hide the listed regions, then `act` and record what Label Studio sent and answered, once the
        suggestions are shown and the canvas settled."""
        if self.page.locator(f"{HIDE_ALL}:enabled").count():
            self.page.click(HIDE_ALL)
        self.page.mouse.move(0, 0)
        wait_until_painted(self.page, self.out / f"{name}-before.png")
        with self.page.expect_response(lambda r: bool(INTERACTIVE.search(r.url)), timeout=ANSWER_TIMEOUT_MS) as sent:
            act()
        response = sent.value
        answer = response.json()
        shown = len((answer.get("data") or {}).get("result") or [])
        self.page.wait_for_function(
            "([info, spinner, n]) => !document.querySelector(spinner) && (n === 0"
            " ? !document.querySelector(info) : document.querySelector(info)?.innerText.startsWith(n + ' '))",
            arg=[SUGGESTIONS, SPINNER, shown],
        )
        self.page.mouse.move(0, 0)
        wait_until_painted(self.page, self.out / f"{name}-stage.png")
        self.page.screenshot(path=str(self.out / f"{name}-page.png"))
        record = {
            "name": name,
            "request": json.loads(response.request.post_data or "{}").get("context"),
            "answer": answer,
            "suggestions": self.page.locator(SUGGESTIONS).inner_text() if shown else "",
            "regions": read_regions(self.page),
        }
        self.steps.append(record)
        return record

    def accept(self) -> None:
        """Accept the shown suggestions (the bottom bar's check button): they become regions in the regions panel,
        and the smart keypoints and boxes go. Recorded as the last step's "accepted" (the regions panel)."""
        record = self.steps[-1]
        self.page.get_by_test_id(ACCEPT).click()
        self.page.wait_for_selector(SUGGESTIONS, state="detached")  # accepted in one action: all, or none yet
        self.page.evaluate(FRAMES)  # the regions panel re-renders after it
        self.page.mouse.move(0, 0)
        self.page.screenshot(path=str(self.out / f"{record['name']}-accepted.png"))
        record["accepted"] = read_regions(self.page)

    def click(self, point: list[float], *, negative: bool = False) -> None:
        x, y = self.point(*point)
        if negative:  # alt+click: the smart keypoint's negative (background) point
            self.page.keyboard.down("Alt")
        self.page.mouse.click(x, y)
        if negative:
            self.page.keyboard.up("Alt")

    def drag(self, corners: list[list[float]]) -> None:
        (x1, y1), (x2, y2) = (self.point(*corner) for corner in corners)
        self.page.mouse.move(x1, y1)
        self.page.mouse.down()
        self.page.mouse.move(x2, y2, steps=12)
        self.page.mouse.up()

    def submit_annotation(self) -> None:
        """The bottom bar's Submit: the annotation, with every accepted region, is saved in Label Studio (the
        regions panel is a virtual list that renders only the rows in view, so the saved annotation is what
        tells which regions were kept)."""
        saved = "/annotations"
        with self.page.expect_response(lambda r: saved in r.url and r.request.method == "POST") as response:
            self.page.get_by_role("button", name="Submit").click()
        if not response.value.ok:
            raise RuntimeError(f"submitting the annotation failed: {response.value.status}")

    def submit_prompt(self, text: str) -> None:
        self.page.get_by_test_id("textarea-input").fill(text)
        self.page.get_by_test_id("textarea-add-button").click()


def annotate(page: Page, args: dict[str, Any], result: dict[str, Any]) -> None:
    """The steps (see the module's docstring), recorded into `result` as they are done."""
    page.goto(f"{args['url']}/projects/{args['project']}/data?task={args['task']}")
    result["image"] = wait_for_image(page)
    editor = Editor(page, Path(args["out"]), args["image"])
    result["steps"] = editor.steps
    editor.turn_on_auto_annotation()
    result["stage"] = page.locator(STAGE).first.bounding_box()

    editor.pick("key-point-tool", "click", args["label"])
    editor.step("click", lambda: editor.click(args["click"]))
    editor.select_label("click", args["label"])
    editor.step("negative", lambda: editor.click(args["negative"], negative=True))
    editor.accept()

    editor.pick("rectangle-tool", "box", args["label"])
    editor.step("box", lambda: editor.drag(args["box"]))
    editor.accept()

    editor.step("prompt", lambda: editor.submit_prompt(args["prompt"]))
    editor.accept()
    editor.submit_annotation()


def main(args: dict[str, Any]) -> None:
    """Run the steps; the result JSON is written even when one fails ("error" then says which and why)."""
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"steps": [], "error": None}
    try:
        with logged_in_page(args) as page:
            try:
                annotate(page, args, result)
            finally:
                page.screenshot(path=str(Path(args["out"]) / "last-page.png"))  # where it stopped
    except Exception as exc:  # the test reports it, with the steps done so far
        result["error"] = f"after {len(result['steps'])} steps: {type(exc).__name__}: {exc}"
        raise
    finally:
        Path(args["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
