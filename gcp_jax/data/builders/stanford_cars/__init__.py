"""TFDS builder stanford_cars (see stanford_cars.py)."""
