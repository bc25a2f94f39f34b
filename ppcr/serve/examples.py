"""The web page's example gallery: synthetic scenes of the kind the demo model is trained on, rendered
by `ppcr.data.synth`, and scikit-image's photographs when scikit-image is installed.

Each example is a PNG and the phrases to try on it. The scenes are images 901 onwards of the demo's
data set (`synth.demo_config`): drawn like its 900 training images, but not among them.
"""

from __future__ import annotations

import functools
import importlib.util
import io

from ..data.synth import demo_config, render_scene

SCENES = 4
# scikit-image's photographs (skimage.data), with phrases that name what is in them.
PHOTOS = {
    "astronaut": ("the astronaut", "the flag"),
    "coffee": ("the cup of coffee", "the spoon"),
    "chelsea": ("the cat",),
    "rocket": ("the rocket",),
}
PHOTOS_HINT = "pip install scikit-image (the photographs come from skimage.data)"


def photos_available() -> bool:
    return importlib.util.find_spec("skimage") is not None


def catalogue() -> dict:
    """{"examples": [{"name", "kind": "synthetic"|"photo", "url", "phrases", "title"}], "photos":
    "available" or how to get them}: what GET /examples answers."""
    items = []
    for i in range(SCENES):
        name = f"scene-{i + 1}"
        _, phrases = _scene(i)
        items.append(
            {
                "name": name,
                "kind": "synthetic",
                "url": f"/examples/{name}.png",
                "phrases": phrases,
                "title": f"synthetic scene {i + 1}",
            }
        )
    available = photos_available()
    if available:
        for name, phrases in PHOTOS.items():
            items.append(
                {
                    "name": name,
                    "kind": "photo",
                    "url": f"/examples/{name}.png",
                    "phrases": list(phrases),
                    "title": f"photograph: {name} (scikit-image)",
                }
            )
    return {"examples": items, "photos": "available" if available else PHOTOS_HINT}


@functools.lru_cache(maxsize=SCENES)
def _scene(i: int):
    image, phrases = render_scene(demo_config(900), 901 + i)
    return image, sorted(set(phrases), key=lambda p: (-len(p), p))[:3]


@functools.lru_cache(maxsize=len(PHOTOS) + SCENES)
def example_png(name: str) -> bytes | None:
    """The PNG of example `name`, or None when there is no such example (or scikit-image is missing)."""
    from PIL import Image

    if name.startswith("scene-") and name[6:].isdigit() and 1 <= int(name[6:]) <= SCENES:
        image = _scene(int(name[6:]) - 1)[0]
    elif name in PHOTOS and photos_available():
        from skimage import data

        image = Image.fromarray(getattr(data, name)())
    else:
        return None
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
