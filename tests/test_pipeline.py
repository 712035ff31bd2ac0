"""The input pipeline over a small dataset built from fake records by the real TFDS builder."""

from __future__ import annotations

# Heavy or optional modules (devkit, TensorFlow, cv2) are imported where they are used.
# pylint: disable=import-outside-toplevel

import os
import pickle

import numpy as np
import pytest

from helpers import tiny_config
from nsmae_jax.data import naming

NUM_TRAIN, NUM_VAL = 11, 5


def _fake_record(config, index: int, rng: np.random.Generator) -> dict:
  """A record with the real layout whose content encodes its index (to check the order)."""
  import cv2
  d = config.data
  images = []
  for cam in range(6):
    img = np.full((d.image_height, d.image_width, 3), (index * 7 + cam * 30) % 250, np.uint8)
    images.append(cv2.imencode('.jpg', img)[1].tobytes())
  n_points = int(rng.integers(10, 2 * d.max_points)) if index else 0  # example 0: empty cloud
  points = rng.normal(size=(n_points, 5)).astype(np.float32)
  points[:, 3] = index
  n_boxes = int(rng.integers(0, 2 * d.max_boxes))
  boxes = rng.normal(size=(n_boxes, 9)).astype(np.float32)
  boxes[:, 0] = index
  cam2lidar = np.tile(np.eye(4, dtype=np.float32), (6, 1, 1))
  cam2lidar[:, 0, 3] = index
  return {'token': f'tok{index:04d}', 'scene_name': 'scene-0', 'timestamp': np.int64(index),
          'images': images, 'intrinsics': np.tile(np.eye(3, dtype=np.float32), (6, 1, 1)),
          'cam2lidar': cam2lidar, 'lidar2ego': np.eye(4, dtype=np.float32),
          'ego2global': np.eye(4, dtype=np.float32), 'points': points,
          'bev_map': (rng.uniform(size=(6, d.bev_cells, d.bev_cells)) > 0.5).astype(np.uint8),
          'boxes': boxes, 'box_labels': rng.integers(0, 10, n_boxes).astype(np.int32)}


def build_fake_dataset(config, counts: dict[str, int]) -> None:
  """Writes fake records and builds nuscenes_nsmae from them with the real Builder."""
  from data_prep.nuscenes_nsmae import nuscenes_nsmae_dataset_builder as builder_lib
  rng = np.random.default_rng(0)
  records = naming.record_dir(config.data.data_dir, config.data)
  tokens, start = {}, 0
  for split, count in counts.items():
    os.makedirs(os.path.join(records, split))
    tokens[split] = []
    for i in range(count):
      rec = _fake_record(config, start + i, rng)
      tokens[split].append(rec['token'])
      with open(naming.record_path(records, split, i, rec['token']), 'wb') as f:
        pickle.dump(rec, f)
    start += count
  builder = builder_lib.Builder(config=builder_lib.builder_config(config.data),
                                data_dir=config.data.data_dir, record_dir=records, splits=tokens)
  builder.download_and_prepare(download_dir=os.path.join(records, 'dl'))


@pytest.fixture(scope='module')
def fake_config(tmp_path_factory):
  config = tiny_config(data_dir=str(tmp_path_factory.mktemp('fake_tfds')), max_points=256,
                       max_boxes=8, bev_half_extent=8.0, per_device_batch_size=2)
  build_fake_dataset(config, {'train': NUM_TRAIN, 'val': NUM_VAL})
  return config


def _ids(batch) -> np.ndarray:
  """The example index of each slot [D, B], read back from cam2lidar."""
  return batch['cam2lidar'][..., 0, 0, 3].astype(int)


def test_batch_contract(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  d = fake_config.data
  batch = next(make_train_iterator(fake_config, num_local_devices=2, process_index=0,
                                   process_count=1))
  n = d.bev_cells
  expected = {'images': ((2, 2, 6, d.image_height, d.image_width, 3), np.float32),
              'intrinsics': ((2, 2, 6, 3, 3), np.float32),
              'cam2lidar': ((2, 2, 6, 4, 4), np.float32),
              'points': ((2, 2, d.max_points, 5), np.float32),
              'points_mask': ((2, 2, d.max_points), np.bool_),
              'bev_map': ((2, 2, 6, n, n), np.uint8),
              'boxes': ((2, 2, d.max_boxes, 9), np.float32),
              'boxes_mask': ((2, 2, d.max_boxes), np.bool_),
              'box_labels': ((2, 2, d.max_boxes), np.int32)}
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key
  assert 0.0 <= batch['images'].min() and batch['images'].max() <= 1.0
  # Padding is zero and the mask says which points are real; intensity column holds the index.
  ids = _ids(batch)
  pts, mask = batch['points'], batch['points_mask']
  assert np.all(pts[~mask] == 0)
  for (i, j), idx in np.ndenumerate(ids):
    assert np.all(pts[i, j][mask[i, j]][:, 3] == idx)
    assert np.all(batch['boxes'][i, j][batch['boxes_mask'][i, j]][:, 0] == idx)


def test_same_seed_same_order_and_epochs_cover_all(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  def ids(config, n):
    it = make_train_iterator(config, num_local_devices=2, process_index=0, process_count=1)
    return np.concatenate([_ids(next(it)).ravel() for _ in range(n)])
  a, b = ids(fake_config, 6), ids(fake_config, 6)
  np.testing.assert_array_equal(a, b)
  c = ids(fake_config.replace(seed=1), 6)
  assert not np.array_equal(a, c)
  # 24 slots = 2 full epochs of 11 + 2: each epoch is a permutation of the split.
  assert sorted(a[:NUM_TRAIN]) == list(range(NUM_TRAIN))
  assert sorted(a[NUM_TRAIN:2 * NUM_TRAIN]) == list(range(NUM_TRAIN))


def test_restored_iterator_continues_identically(fake_config):
  import json
  from nsmae_jax.data.pipeline import make_train_iterator
  it = make_train_iterator(fake_config, num_local_devices=2, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  resumed = make_train_iterator(fake_config, num_local_devices=2, process_index=0,
                                process_count=1)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_processes_split_the_stream(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  got = [np.concatenate([_ids(b).ravel() for b, _ in zip(
      make_train_iterator(fake_config, num_local_devices=1, process_index=p, process_count=2),
      range(3))]) for p in range(2)]
  # Slots of both processes together form one epoch (11) + 1 of the next: no duplicates within
  # the first epoch.
  first = np.concatenate(got)
  assert len(set(first)) >= NUM_TRAIN - 1 and len(first) == 12


@pytest.mark.parametrize('process_count,devices', [(1, 2), (2, 1), (3, 2)])
def test_eval_visits_each_example_once(fake_config, process_count, devices):
  from nsmae_jax.data.pipeline import make_eval_iterator
  seen, lengths = [], set()
  for p in range(process_count):
    batches = list(make_eval_iterator(fake_config, process_index=p, process_count=process_count,
                                      num_local_devices=devices))
    lengths.add(len(batches))
    for b in batches:
      assert b['valid'].shape == (devices, 2)
      seen += list(_ids(b)[b['valid']])
  assert len(lengths) == 1  # all processes step together
  assert sorted(seen) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_VAL))


def test_label_fraction_subset_is_seeded(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  def subset(seed):
    it = make_train_iterator(fake_config, label_fraction=0.4, subset_seed=seed,
                             num_local_devices=2, process_index=0, process_count=1)
    return set(np.concatenate([_ids(next(it)).ravel() for _ in range(4)]))
  a = subset(0)
  assert len(a) == round(0.4 * NUM_TRAIN)
  assert a == subset(0)
  assert a != subset(1)


def test_empty_point_cloud_gives_empty_mask(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  it = make_train_iterator(fake_config, num_local_devices=1, process_index=0, process_count=1)
  for _ in range(NUM_TRAIN):
    batch = next(it)
    ids = _ids(batch)
    if (ids == 0).any():
      assert not batch['points_mask'][ids == 0].any()
      return
  pytest.fail('example 0 not seen in one epoch')


def test_truncated_shard_error_names_it(fake_config, tmp_path):
  import shutil
  from nsmae_jax.data.shards import ShardError
  from nsmae_jax.data.pipeline import make_train_iterator, open_split
  config = fake_config.replace(data_dir=str(tmp_path / 'copy'))
  shutil.copytree(fake_config.data.data_dir, config.data.data_dir)
  shard = open_split(config, 'train')[1][0]
  size = os.path.getsize(shard)
  with open(shard, 'r+b') as f:
    f.truncate(size - 100)
  with pytest.raises(ShardError, match=os.path.basename(shard)):
    next(make_train_iterator(config, num_local_devices=1, process_index=0, process_count=1))


def test_corrupt_shard_error_names_it(fake_config, tmp_path):
  import shutil
  from nsmae_jax.data.shards import ShardError, ShardIndex
  from nsmae_jax.data.pipeline import make_eval_iterator, open_split
  config = fake_config.replace(data_dir=str(tmp_path / 'copy'))
  shutil.copytree(fake_config.data.data_dir, config.data.data_dir)
  shard = open_split(config, 'val')[1][0]
  index = ShardIndex([shard])
  with open(shard, 'r+b') as f:  # overwrite the middle of every record's payload
    for off, n in zip(index.offset, index.length):
      f.seek(int(off) + 10)
      f.write(b'\xff' * min(200, int(n) - 20))
  with pytest.raises(ShardError, match=os.path.basename(shard)):
    list(make_eval_iterator(config, num_local_devices=1, process_index=0, process_count=1))
