"""TFDS builder synthetic_fgvc (see synthetic_fgvc.py)."""
