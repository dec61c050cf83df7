"""The own TFDS builders; importing this package registers them with TFDS."""

from gcp_jax.data.builders.fgvc_aircraft.fgvc_aircraft import FgvcAircraft
from gcp_jax.data.builders.stanford_cars.stanford_cars import StanfordCars
from gcp_jax.data.builders.synthetic_fgvc.synthetic_fgvc import SyntheticFgvc, synthetic_config

__all__ = ["FgvcAircraft", "StanfordCars", "SyntheticFgvc", "synthetic_config"]
