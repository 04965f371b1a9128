"""Render a Snakemake report to PNG screenshots, one per figure, with headless Chromium (a developer check).

    apt-get install chromium && pip install playwright   # Debian's Chromium; playwright only drives it
    snakemake --cores 4 report_baseline2 --configfile config/toy.yaml
    snakemake report_baseline2 --report report.html --configfile config/toy.yaml
    python scripts/render_report.py report.html screenshots/

Opens each result category of the report, shows each file (the eye icon next to it) and saves a screenshot.
"""

from __future__ import annotations

import sys
from pathlib import Path

CATEGORIES = {
    "1. Gate": ["gate.html"],
    "2. Parity": ["taps_heatmap.png", "logits_hist.png", "routing.png"],
    "3. Benchmarks": ["benchmarks.png"],
    "4. Promoted": ["manifest.html"],
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main(report: Path, outdir: Path) -> int:
    from playwright.sync_api import sync_playwright

    outdir.mkdir(parents=True, exist_ok=True)
    url = report.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        page.goto(url)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(outdir / "00_overview.png"))
        for index, (category, files) in enumerate(CATEGORIES.items(), start=1):
            for name in files:
                page.goto(url)
                page.wait_for_timeout(800)
                page.get_by_text(category).first.click()
                page.wait_for_timeout(600)
                label = page.get_by_text(name, exact=False).first.bounding_box()
                for candidate in page.locator("a, button, span, svg").all():
                    box = candidate.bounding_box()
                    on_row = box and abs(box["y"] - label["y"]) < 12 and box["x"] > label["x"] + label["width"] - 5
                    if on_row and box["width"] < 40:  # the "show" (eye) icon right of the file name
                        candidate.click()
                        break
                page.wait_for_timeout(1200)
                page.screenshot(path=str(outdir / f"{index:02d}_{Path(name).stem}.png"))
        browser.close()
    print(f"screenshots in {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
