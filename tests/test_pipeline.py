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
  from data_prep.nuscenes_nsmae import record_io
  rng = np.random.default_rng(0)
  records = naming.record_dir(config.data.data_dir, config.data)
  tokens, start = {}, 0
  for split, count in counts.items():
    os.makedirs(os.path.join(records, split))
    tokens[split] = []
    for i in range(count):
      rec = _fake_record(config, start + i, rng)
      tokens[split].append(rec['token'])
      record_io.save_record(naming.record_path(records, split, rec['token']), rec)
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
  # grain seeds epoch e by seed + e: seed 1 must not replay seed 0's epochs shifted by one.
  assert not np.array_equal(c[:NUM_TRAIN], a[NUM_TRAIN:2 * NUM_TRAIN])
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


def test_state_of_another_order_is_refused(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  kw = dict(num_local_devices=2, process_index=0, process_count=1)
  it = make_train_iterator(fake_config, **kw)
  next(it)
  state = it.get_state()
  with pytest.raises(ValueError, match='seed=0'):
    make_train_iterator(fake_config.replace(seed=1), **kw).set_state(state)
  with pytest.raises(ValueError, match='local_batch=4'):
    make_train_iterator(fake_config, num_local_devices=1, process_index=0,
                        process_count=1).set_state(state)
  with pytest.raises(ValueError, match='num_examples=11'):
    make_train_iterator(fake_config, label_fraction=0.5, **kw).set_state(state)


def test_close_then_next_continues(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  kw = dict(num_local_devices=1, process_index=0, process_count=1)
  want = [_ids(b).ravel() for b, _ in zip(make_train_iterator(fake_config, **kw), range(4))]
  it = make_train_iterator(fake_config, **kw)
  got = [_ids(next(it)).ravel() for _ in range(2)]
  it.close()  # releases grain's threads; the position is kept
  got += [_ids(next(it)).ravel() for _ in range(2)]
  np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(fake_config):
  import json
  from nsmae_jax.data.pipeline import make_train_iterator
  kw = dict(num_local_devices=2, process_index=0, process_count=1)
  plain = make_train_iterator(fake_config, **kw)
  want = [next(plain) for _ in range(5)]
  workers = make_train_iterator(fake_config, num_workers=2, **kw)
  try:
    for expected in want[:2]:
      got = next(workers)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    state = json.loads(json.dumps(workers.get_state()))
  finally:
    workers.close()
  resumed = make_train_iterator(fake_config, num_workers=2, **kw)
  try:
    resumed.set_state(state)
    for expected in want[2:]:
      got = next(resumed)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  finally:
    resumed.close()
  with pytest.raises(ValueError, match='num_workers'):
    make_train_iterator(fake_config, **kw).set_state(state)


def test_processes_split_the_stream(fake_config):
  from nsmae_jax.data.pipeline import make_train_iterator
  def stream(p, count, batches):
    it = make_train_iterator(fake_config, num_local_devices=1, process_index=p,
                             process_count=count)
    return np.concatenate([_ids(next(it)).ravel() for _ in range(batches)])
  # Stream position q goes to process q % 2: the two processes partition one stream (two
  # epochs here), so within an epoch they never see the same example.
  whole = stream(0, 1, NUM_TRAIN)
  np.testing.assert_array_equal(stream(0, 2, NUM_TRAIN // 2), whole[0:2 * NUM_TRAIN - 2:2])
  np.testing.assert_array_equal(stream(1, 2, NUM_TRAIN // 2), whole[1:2 * NUM_TRAIN - 2:2])


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
  from nsmae_jax.data.pipeline import make_eval_iterator
  from nsmae_jax.data.subsets import labelled_subset
  a = subset(0)
  assert len(a) == round(0.4 * NUM_TRAIN)
  # The report's formula picks positions in the split's stored order (an eval pass).
  stored = np.concatenate([_ids(b)[b['valid']] for b in make_eval_iterator(
      fake_config, split='train', num_local_devices=1, process_index=0, process_count=1)])
  assert a == set(stored[labelled_subset(NUM_TRAIN, 0.4, 0)])
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
  with pytest.raises(ShardError, match=os.path.basename(shard)) as error:
    list(make_eval_iterator(config, num_local_devices=1, process_index=0, process_count=1))
  assert 'data CRC mismatch' in str(error.value)
  assert index.check(0) == 'data CRC mismatch'


def test_shard_index_checks_crcs_and_pickles(fake_config):
  from nsmae_jax.data.shards import ShardIndex, masked_crc32c
  from nsmae_jax.data.pipeline import open_split
  # CRC-32C check value of '123456789' is 0xE3069283; TFRecord stores it masked.
  crc = 0xE3069283
  assert masked_crc32c(b'123456789') == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  index = ShardIndex(open_split(fake_config, 'train')[1])
  assert len(index) == NUM_TRAIN
  assert [index.check(i) for i in range(len(index))] == [None] * NUM_TRAIN  # TF's CRCs agree
  copy = pickle.loads(pickle.dumps(index))
  assert copy.read(3) == index.read(3) and copy.describe(3) == index.describe(3)


def test_fit_keeps_the_nearest_boxes_when_there_are_too_many():
  from nsmae_jax.data.decode import fit
  rng = np.random.default_rng(0)
  k = 9
  boxes = np.zeros((k, 9), np.float32)
  boxes[:, 0] = rng.permutation(np.arange(k) * 10.0)  # x = 0, 10, ..., 80 m in shuffled order
  example = {'points': np.zeros((0, 5), np.float32), 'boxes': boxes,
             'box_labels': np.arange(k, dtype=np.int32),
             'images': [np.zeros((2, 3, 3), np.uint8)] * 6, 'intrinsics': np.zeros((6, 3, 3)),
             'cam2lidar': np.zeros((6, 4, 4)), 'bev_map': np.zeros((6, 2, 2), np.uint8)}
  out = fit(example, max_points=4, max_boxes=4, rng=rng)
  assert out['boxes_mask'].all()
  np.testing.assert_array_equal(np.sort(out['boxes'][:, 0]), [0.0, 10.0, 20.0, 30.0])
  # Each kept box keeps its own label.
  for box, label in zip(out['boxes'], out['box_labels']):
    assert boxes[label, 0] == box[0]
  short = fit(dict(example, boxes=boxes[:2], box_labels=np.arange(2, dtype=np.int32)),
              max_points=4, max_boxes=4, rng=rng)
  np.testing.assert_array_equal(short['boxes_mask'], [True, True, False, False])
