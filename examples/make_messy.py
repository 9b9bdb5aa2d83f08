"""Build examples/messy/: public-domain scikit-image sample photos plus planted problems.

Run once to regenerate the bundled example (needs `pip install scikit-image`); the output is committed,
so users never need to run this. Planted problems are listed in examples/messy/PLANTED.md.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

OUT = Path(__file__).parent / "messy"


def photos() -> dict[str, Image.Image]:
    import skimage.data as d

    def rgb(a):
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        img = Image.fromarray(a)
        return img.convert("RGB")

    out = {}
    for name in [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "moon",
        "immunohistochemistry",
        "grass",
        "gravel",
        "brick",
        "clock",
        "cell",
    ]:
        out[name] = rgb(getattr(d, name)())
    hubble = rgb(d.hubble_deep_field())
    retina = rgb(d.retina())
    out["hubble"] = hubble.resize((600, 523), Image.Resampling.LANCZOS)
    out["retina"] = retina.resize((640, 640), Image.Resampling.LANCZOS)
    for k, (x, y) in enumerate([(0, 0), (400, 300), (100, 350)]):
        out[f"hubble_crop{k}"] = hubble.crop((x, y, x + 600, y + 520))
    for k, (x, y) in enumerate([(200, 200), (700, 150), (300, 800)]):
        out[f"retina_crop{k}"] = retina.crop((x, y, x + 512, y + 512))
    astro = rgb(d.astronaut())
    out["astronaut_face"] = astro.crop((140, 20, 300, 180)).resize((480, 480), Image.Resampling.LANCZOS)
    return out


def save(img: Image.Image, rel: str, **kw) -> None:
    p = OUT / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p, **kw)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    pics = photos()
    for name, img in pics.items():
        folder = "portraits" if name in ("astronaut", "chelsea", "camera", "astronaut_face") else "misc"
        save(img, f"{folder}/{name}.jpg", quality=92)
    # Planted problems.
    shutil.copy(OUT / "misc/coffee.jpg", OUT / "misc/coffee (copy).jpg")  # exact duplicate
    pics["rocket"].resize((320, 214), Image.Resampling.LANCZOS).save(
        OUT / "misc/rocket_small.jpg", quality=70
    )
    (OUT / "downloads").mkdir()
    pics["astronaut"].resize((400, 400), Image.Resampling.BICUBIC).save(
        OUT / "downloads/astronaut_400.webp", quality=80
    )
    pics["chelsea"].filter(ImageFilter.GaussianBlur(4)).save(
        OUT / "downloads/chelsea_blurred.jpg", quality=90
    )
    pics["coins"].resize((96, 76)).save(OUT / "downloads/coins_thumb.png")  # tiny
    ImageEnhance.Brightness(pics["brick"]).enhance(0.08).save(OUT / "downloads/brick_dark.jpg", quality=90)
    pics["hubble"].crop((0, 200, 600, 350)).resize((1200, 300)).save(
        OUT / "downloads/hubble_strip.jpg"
    )  # 4:1
    Image.new("RGB", (512, 512), (128, 128, 130)).save(
        OUT / "downloads/grey_placeholder.png"
    )  # no information
    buf = io.BytesIO()
    pics["moon"].save(buf, "JPEG", quality=90)
    (OUT / "downloads/moon_partial.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])  # truncated
    (OUT / "downloads/notes.jpg").write_text("this is not an image\n")  # wrong extension
    (OUT / "downloads/empty.png").write_bytes(b"")  # zero bytes
    # A user-written caption that must survive every stage.
    (OUT / "portraits/astronaut.txt").write_text(
        "a woman in a spacesuit, holding a helmet, flag behind her\n"
    )
    (OUT / "curate.toml").write_text(
        "# Options for this example dataset (defaults are documented in curate/config.py).\n"
        "[filter]\nmin_side = 300          # the sample photos are small; real LoRA sets want 512+\n"
    )
    (OUT / "PLANTED.md").write_text(
        "# Planted problems in this example\n\n"
        "- misc/coffee (copy).jpg: exact copy of misc/coffee.jpg\n"
        "- misc/rocket_small.jpg: smaller re-compressed copy of misc/rocket.jpg (near duplicate; also too small)\n"
        "- downloads/astronaut_400.webp: resized WebP copy of portraits/astronaut.jpg (near duplicate)\n"
        "- downloads/chelsea_blurred.jpg: blurred copy of portraits/chelsea.jpg\n"
        "- downloads/coins_thumb.png: 96x76 thumbnail (too small)\n"
        "- downloads/brick_dark.jpg: nearly black (too dark)\n"
        "- downloads/hubble_strip.jpg: 4:1 strip (odd aspect ratio)\n"
        "- downloads/grey_placeholder.png: flat grey (no information)\n"
        "- downloads/moon_partial.jpg: truncated download\n"
        "- downloads/notes.jpg: a text file with an image extension\n"
        "- downloads/empty.png: zero bytes\n"
    )


if __name__ == "__main__":
    main()
