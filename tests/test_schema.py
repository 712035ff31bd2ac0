"""The schema module agrees with nuscenes-devkit (its lists are not repeated anywhere else)."""

from nsmae_jax.data import schema


def test_detection_classes_are_the_devkits():
  from nuscenes.eval.detection.constants import DETECTION_NAMES  # pylint: disable=import-outside-toplevel
  assert schema.DETECTION_CLASSES == tuple(DETECTION_NAMES)


def test_map_locations_are_the_devkits():
  from nuscenes.map_expansion.map_api import NuScenesMap  # pylint: disable=import-outside-toplevel
  import inspect  # pylint: disable=import-outside-toplevel
  source = inspect.getsource(NuScenesMap.__init__)
  for location in schema.MAP_LOCATIONS:
    assert location in source
