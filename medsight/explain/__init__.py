"""Heat maps (Grad-CAM) and overlays for predictions."""

from medsight.explain.gradcam import gradcam
from medsight.explain.overlay import overlay_rgb, save_heatmap, save_overlay
from medsight.predict.cam import resize_map

__all__ = ["gradcam", "resize_map", "overlay_rgb", "save_overlay", "save_heatmap"]
