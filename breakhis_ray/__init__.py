"""breakhis-ray: Ray-native BreakHis histopathology training, segmentation and batch inference.

Kept import-light on purpose: nothing heavy (ray, torch, smp) is imported here.
"""

__version__ = "0.1.0"
