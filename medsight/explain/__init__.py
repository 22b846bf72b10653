"""Heat maps (Grad-CAM) and overlays for predictions."""

from medsight.explain.gradcam import gradcam, resize_map
from medsight.explain.overlay import overlay_rgb, save_heatmap, save_overlay

__all__ = ["gradcam", "resize_map", "overlay_rgb", "save_overlay", "save_heatmap"]
