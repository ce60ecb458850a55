"""A real headless Chromium (Debian's `chromium`, as installed: nothing downloaded) driven by Playwright, with
what the GUI's tests ask of a live Bokeh page: its models by name, where a data point is on screen."""

from __future__ import annotations

import os
import shutil
import time

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

# Screen position of data point (x, y) in the plot named `name`, from Bokeh's own view of it (its scales).
AT = """([name, x, y]) => {
  const view = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(name));
  const r = view.canvas_view.el.getBoundingClientRect();
  return {x: r.left + view.frame.x_scale.compute(x), y: r.top + view.frame.y_scale.compute(y)};
}"""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_or_skip() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path


class Browser:
    def __init__(self, executable: str, width: int = 1400, height: int = 1400):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            self.page = self.browser.new_page(viewport={"width": width, "height": height})
        except Exception:
            self._playwright.stop()
            raise
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text))

    def goto(self, url: str) -> None:
        self.page.goto(url)
        self.wait_for("window.Bokeh !== undefined && Bokeh.documents.length > 0")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def model(self, name: str, attribute: str = "data"):
        """A Bokeh model's attribute as the page has it (`data` of a source: columns as lists)."""
        return self.js(
            """([name, attribute]) => { const m = Bokeh.documents[0].get_model_by_name(name);
                 const v = m[attribute];
                 if (attribute !== 'data') return v;
                 const out = {}; for (const [k, c] of Object.entries(v)) out[k] = Array.from(c); return out; }""",
            [name, attribute],
        )

    def column_length(self, name: str, column: str) -> int:
        return self.js("([n, c]) => Bokeh.documents[0].get_model_by_name(n).data[c].length", [name, column])

    def wait_for(self, expression: str, timeout: float = 30.0, arg=None, explain: str | None = None):
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.js(expression, arg)
            except Exception:  # the page not there yet, a model not made yet
                value = None
            if value:
                return value
            time.sleep(0.1)
        why = ""
        if explain is not None:  # what the page says about it, to read in the failure
            try:
                why = f"; {explain}: {self.js(explain)!r}"
            except Exception as exc:
                why = f"; {explain}: {exc}"
        raise AssertionError(f"timed out waiting for {expression!r} (last value {value!r}){why}")

    def click_at(self, plot: str, x: float, y: float) -> None:
        """A real mouse click where data point (x, y) is drawn in the named plot."""
        at = self.js(AT, [plot, x, y])
        self.page.mouse.click(at["x"], at["y"])

    def click_widget(self, name: str, selector: str = "input") -> None:
        """A real mouse click on the named Bokeh widget's element (inside its shadow DOM)."""
        handle = self.page.evaluate_handle(
            "([n, s]) => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(n)).shadow_el.querySelector(s)",
            [name, selector],
        )
        handle.as_element().click()

    def screenshot(self, name: str | None = None) -> bytes:
        """The whole page, or one named Bokeh model's element."""
        if name is None:
            return self.page.screenshot()
        handle = self.page.evaluate_handle(
            "n => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(n)).el", name
        )
        return handle.as_element().screenshot()

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()
