"""cxr_platform: train, explain, serve and monitor a chest X-ray Normal/Pneumonia classifier."""

__version__ = "0.1.0"
