"""Screenshots of every `curate review` view into docs/review/*.png (headless Chromium via Playwright).

    python docs/make_review_screenshots.py [DATASET]

Without DATASET it builds the small test dataset of tests/test_review.py in a temporary folder.
Needs `pip install 'curate[review,dev]'` and a Chromium at /usr/bin/chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "review"
VIEWS = ("dups", "rejects", "captions", "split", "buckets")


def main() -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from curate.review.server import running

    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) > 1:
            root = Path(sys.argv[1])
        else:
            from tests.test_review import build_dataset

            root = build_dataset(Path(tmp) / "ds")
        OUT.mkdir(exist_ok=True)
        with running(root) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            base, token = url.split("?")
            page.goto(url)
            for view in VIEWS:
                page.goto(f"{base}{view}")
                page.wait_for_load_state("networkidle")
                if view == "rejects":  # show a preview line
                    page.fill('input.thr[data-threshold="min_sharpness"]', "40")
                    page.wait_for_function("document.getElementById('preview').textContent.includes('would')")
                shot = OUT / f"{view}.png"
                page.screenshot(path=str(shot), full_page=False)
                small = Image.open(shot).convert("RGB").quantize(128, dither=Image.Dither.NONE)
                small.save(shot, optimize=True)  # a palette keeps the docs small
                print(OUT / f"{view}.png")
            browser.close()


if __name__ == "__main__":
    main()
