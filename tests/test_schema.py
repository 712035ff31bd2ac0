"""The schema module agrees with nuscenes-devkit (its lists are not repeated anywhere else)."""

from nsmae_jax.data import schema


def test_detection_classes_are_the_devkits():
  from nuscenes.eval.detection.constants import DETECTION_NAMES  # pylint: disable=import-outside-toplevel
  assert schema.DETECTION_CLASSES == tuple(DETECTION_NAMES)


def test_map_locations_are_the_devkits():
  from nuscenes.map_expansion import map_api  # pylint: disable=import-outside-toplevel
  assert schema.MAP_LOCATIONS == tuple(map_api.locations)
