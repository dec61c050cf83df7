"""TFDS builder fgvc_aircraft (see fgvc_aircraft.py)."""
