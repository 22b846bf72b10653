"""Heat maps (Grad-CAM) and overlays for predictions.

The names below are imported on first use (PEP 562): writing an overlay needs Pillow, not
the torch and MONAI that Grad-CAM needs.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it
_WHERE = {
    "gradcam": "medsight.explain.gradcam", "resize_map": "medsight.predict.cam",
    "overlay_rgb": "medsight.explain.overlay", "save_overlay": "medsight.explain.overlay",
    "save_heatmap": "medsight.explain.overlay",
}
__all__ = list(_WHERE)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
