"""Typed configuration for nsmae_jax.

Library code receives a `Config`; it never reads absl FLAGS. The absl flags in
`experiments/flags.py` are generated from the fields below (one flag per field, flag name =
field name, help = the field's `help` metadata), so a field documented here is documented on
the command line too.

Geometry conventions (see DESIGN.md): every BEV grid is indexed [x, y] in the key frame's
LIDAR_TOP frame (x right, y forward, z up, metres). Cell (i, j) of a grid with half extent E and
cell size r is centred at x = -E + (i + 0.5) * r, y = -E + (j + 0.5) * r.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
  """A bad configuration value; the message starts with the offending flag: `--name: ...`."""


# A check takes the field's value and returns None when it is fine, else what is wrong.
Check = Callable[[Any], 'str | None']


def positive(x: Any) -> str | None:
  return None if x > 0 else f'must be > 0, got {x}'


def non_negative(x: Any) -> str | None:
  return None if x >= 0 else f'must be >= 0, got {x}'


def fraction(x: Any) -> str | None:
  """A ratio in [0, 1) (mask ratios)."""
  return None if 0.0 <= x < 1.0 else f'must be in [0, 1), got {x}'


def label_fraction(x: Any) -> str | None:
  return None if 0.0 < x <= 1.0 else f'must be in (0, 1], got {x}'


def one_of(*choices: str) -> Check:
  return lambda x: None if x in choices else f'must be {" or ".join(choices)}, got {x!r}'


def _f(default: Any, help: str, check: Check | None = None,  # pylint: disable=redefined-builtin
       **kw: Any) -> Any:
  """A dataclass field with a help string (becomes the absl flag's help) and an optional
  per-field check (run by Config.validate)."""
  metadata = {'help': help, 'check': check, **kw}
  if isinstance(default, (list, dict)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where data lives and what one example looks like."""
  data_dir: str = _f('data/tfds', 'TFDS data dir holding the converted `nuscenes_nsmae` dataset.')
  dataroot: str = _f('data/nuscenes_synthetic', 'nuScenes-format dataroot (real or synthetic) '
                     'that the converter reads.')
  version: str = _f('v1.0-trainval', 'nuScenes table version under the dataroot.')
  synthetic: bool = _f(True, 'If the dataset is missing, generate a synthetic nuScenes-format '
                       'world into --dataroot and convert it first (demo / CI path).')
  synthetic_scenes: int = _f(4, 'Synthetic world: number of scenes (when --synthetic).',
                             check=positive)
  synthetic_val_scenes: int = _f(1, 'Synthetic world: how many of those scenes are val.',
                                 check=non_negative)
  synthetic_frames_per_scene: int = _f(10, 'Synthetic world: key frames per scene.', check=positive)
  synthetic_seed: int = _f(0, 'Synthetic world: seed of the procedural town.')
  synthetic_image_width: int = _f(400, 'Synthetic world: native camera image width (px).')
  synthetic_image_height: int = _f(225, 'Synthetic world: native camera image height (px).')
  image_height: int = _f(64, 'Stored/model image height (px); images are resized to this.',
                         check=positive)
  image_width: int = _f(176, 'Stored/model image width (px).', check=positive)
  num_sweeps: int = _f(1, 'LiDAR sweeps merged into each key frame (the key frame counts as 1; '
                       'nuScenes practice is 10).', check=positive)
  max_points: int = _f(16384, 'Points per example after padding/subsampling (P).', check=positive)
  max_boxes: int = _f(64, 'Boxes per example after padding (M).', check=positive)
  bev_half_extent: float = _f(32.0, 'Half extent of the BEV map targets and of every BEV grid '
                              '(m): the grid spans [-E, E] in x and y of the LiDAR frame.',
                              check=positive)
  bev_resolution: float = _f(0.5, 'Cell size of the BEV map targets (m).', check=positive)
  prefetch: int = _f(2, 'Batches the input pipeline reads ahead (grain read-ahead buffer).',
                     check=non_negative)
  data_workers: int = _f(0, 'grain worker processes decoding training/eval batches (0 = threads '
                         'in the training process; workers take seconds to start).',
                         check=non_negative)
  convert_workers: int = _f(2, 'Worker processes used when converting a dataroot.',
                            check=non_negative)

  @property
  def bev_cells(self) -> int:
    """Cells along x (and y) of the BEV map target: 2 E / r."""
    return int(round(2 * self.bev_half_extent / self.bev_resolution))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Network sizes and geometry of the pillar canvas and the fused volume."""
  model_size: str = _f('demo', 'Named model size from nsmae_jax.models.MODEL_SIZES (demo, base); '
                       'the size overrides the encoder widths/depths below when they are 0.')
  patch_size: int = _f(8, 'ViT patch size (px); image height and width must be divisible by it.',
                       check=positive)
  vit_width: int = _f(0, 'ViT token width (0 = from --model_size).')
  vit_depth: int = _f(0, 'ViT transformer blocks (0 = from --model_size).')
  vit_heads: int = _f(0, 'ViT attention heads (0 = from --model_size).')
  pillar_size: float = _f(0.5, 'Pillar edge (m); the pillar canvas covers [-E, E]^2 of the BEV '
                          'extent, so 2E / pillar_size cells per side.', check=positive)
  pillar_features: int = _f(0, 'PFN output channels (0 = from --model_size).')
  bev_channels: int = _f(0, 'Channels of the LiDAR BEV backbone and the fused BEV map '
                         '(0 = from --model_size).')
  volume_stride: int = _f(4, 'Fused volume cell = pillar_size * volume_stride (m) in x and y.',
                          check=positive)
  z_min: float = _f(-3.0, 'Bottom of the pillars and of the fused volume (m, LiDAR frame).')
  z_max: float = _f(3.0, 'Top of the pillars and of the fused volume (m, LiDAR frame).')
  volume_z_cells: int = _f(6, 'Cells of the fused volume along z.', check=positive)
  volume_channels: int = _f(0, 'Channels of the fused 3D volume (0 = from --model_size).')
  image_mask_ratio: float = _f(0.5, 'Fraction of image patches masked per camera (MAE); '
                               'in [0, 1).', check=fraction)
  lidar_mask_ratio: float = _f(0.8, 'Fraction of non-empty LiDAR blocks (one fused-volume '
                               'cell: volume_stride x volume_stride pillars) dropped per sample; '
                               'in [0, 1). The paper uses 0.7-0.9.', check=fraction)


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """The NeRF-style renderer and the rays drawn per step."""
  num_samples: int = _f(32, 'Samples per ray between near and far (field evaluations per ray).',
                        check=positive)
  perspective_rays: int = _f(1024, 'Perspective rays per example per step (half at pixels hit '
                             'by LiDAR points, with depth targets; half random, colour only).',
                             check=non_negative)
  bev_rays: int = _f(512, 'Top-down BEV rays per example per step.', check=non_negative)
  pos_freqs: int = _f(6, 'Positional-encoding frequencies of the sample position.')
  dir_freqs: int = _f(4, 'Positional-encoding frequencies of the view direction.')
  field_width: int = _f(64, 'Hidden width of the field MLP.', check=positive)
  field_depth: int = _f(2, 'Hidden layers of the field MLP.', check=positive)
  near: float = _f(0.5, 'Near bound of perspective rays (m); far is where a ray leaves the '
                   'volume.')
  background: str = _f('learned', 'What a ray meets after leaving the volume: learned (a '
                       'learned colour composited with the remaining transmittance), black, or '
                       'exclude (black, and perspective rays without an in-volume LiDAR return '
                       'that leave through the top or sides get no colour loss).',
                       check=one_of('learned', 'black', 'exclude'))
  sampling: str = _f('stratified', 'Where each ray\'s --num_samples field evaluations go: '
                     'stratified (equal bins over [near, far]) or lidar (inverse-CDF samples '
                     'from an occupancy grid of the unmasked LiDAR returns plus a uniform floor; '
                     'see docs/lidar_sampling.md). Both views.',
                     check=one_of('stratified', 'lidar'))
  coarse_samples: int = _f(128, '--sampling=lidar: occupancy lookups per ray (no field MLP) '
                           'that build its sample pdf.', check=positive)
  uniform_fraction: float = _f(0.2, '--sampling=lidar: share of the pdf spread uniformly over '
                               '[near, far], so rays past unscanned surfaces still get samples.',
                               check=lambda x: None if 0.0 <= x <= 1.0 else
                               f'must be in [0, 1], got {x}')
  occupancy_cell: float = _f(0.5, '--sampling=lidar: cell size (m) of the LiDAR occupancy grid '
                             'over the fused volume\'s bounds.', check=positive)
  occupancy_dilation: int = _f(1, '--sampling=lidar: cells each LiDAR return\'s cell is dilated '
                               'by.', check=non_negative)
  free_space_carving: bool = _f(False, '--sampling=lidar: carve the cells each LiDAR ray passes '
                                'through on its way to its return as free; the uniform share of '
                                'the pdf then goes to occupied and unknown cells only (see '
                                'docs/lidar_sampling.md: in pre-training it made learned depth '
                                'worse). Off: the binary grid.')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights; 0 switches a term off (ablations)."""
  perspective_color_weight: float = _f(1.0, 'Weight of the perspective-view L2 colour loss.',
                                       check=non_negative)
  perspective_depth_weight: float = _f(0.1, 'Weight of the perspective-view L1 depth loss '
                                       '(depth in m).', check=non_negative)
  bev_color_weight: float = _f(1.0, 'Weight of the BEV-view L2 colour loss.', check=non_negative)
  bev_depth_weight: float = _f(0.1, 'Weight of the BEV-view L1 depth loss (m).', check=non_negative)
  masked_loss: str = _f('all', 'Which targets the loss scores: all, masked (only targets whose '
                        'source was hidden from the encoder: colour at masked image patches, depth '
                        'of dropped LiDAR blocks), or weighted (masked ones x --masked_weight).',
                        check=one_of('all', 'masked', 'weighted'))
  masked_weight: float = _f(3.0, 'Weight of masked targets relative to visible ones when '
                            '--masked_loss=weighted.', check=non_negative)
  target_time_lag: float = _f(0.0, 'LiDAR points with time lag <= this (s) give depth/colour '
                              'targets; 0 = key-frame points only (sweeps of moving objects are '
                              'displaced).', check=non_negative)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging and checkpointing."""
  workdir: str = _f('runs/demo', 'Directory for checkpoints, metrics.jsonl, TensorBoard events '
                    'and images. An existing workdir is resumed from its latest checkpoint.')
  num_train_steps: int = _f(300, 'Total optimisation steps.', check=positive)
  per_device_batch_size: int = _f(1, 'Examples per device per step.', check=positive)
  learning_rate: float = _f(1e-3, 'Peak learning rate (AdamW, warmup + cosine decay).',
                            check=positive)
  warmup_steps: int = _f(30, 'Linear warmup steps.', check=non_negative)
  weight_decay: float = _f(0.01, 'AdamW weight decay.', check=non_negative)
  grad_clip_norm: float = _f(1.0, 'Global gradient-norm clip (0 = off).', check=non_negative)
  seed: int = _f(0, 'Seed of parameters, masks, rays and data order.')
  log_every_steps: int = _f(10, 'Steps between scalar logs (console, TensorBoard, metrics.jsonl).',
                            check=positive)
  checkpoint_every_steps: int = _f(100, 'Steps between orbax checkpoints.', check=positive)
  eval_every_steps: int = _f(100, 'Steps between evaluations on the val split (0 = only at end).',
                             check=non_negative)
  image_every_steps: int = _f(100, 'Steps between rendered-image summaries.', check=non_negative)
  eval_batches: int = _f(4, 'Val batches per evaluation (0 = the whole split).', check=non_negative)
  max_to_keep: int = _f(3, 'Checkpoints kept.', check=non_negative)
  half_precision: bool = _f(False, 'bfloat16 activations (for GPU/TPU).')
  remat: bool = _f(False, 'Rematerialise activations (jax.checkpoint) of the ViT blocks, the '
                   'camera lifting and the renderer (sample interpolation + field MLP): they are '
                   'recomputed in the backward pass instead of kept from the forward pass. Less '
                   'device memory for ~1/3 more forward compute; same parameters and numbers.')
  coordinator_address: str = _f('', 'Multi-host: host:port of process 0 for '
                                'jax.distributed.initialize (empty = single host, or automatic on '
                                'TPU pods with --distributed).')
  num_processes: int = _f(1, 'Multi-host: number of processes.', check=positive)
  process_id: int = _f(0, 'Multi-host: this process index.')
  distributed: bool = _f(False, 'Call jax.distributed.initialize() (automatic on TPU pods and '
                         'SLURM; uses the three flags above when given).')
  parallelism: str = _f('pmap', 'Data-parallel wrapper of the train/eval step: pmap (over the '
                        'local devices) or jit (jit + shard_map over a Mesh of all devices, batch '
                        'sharded, state replicated); same numbers, interchangeable checkpoints.',
                        check=one_of('pmap', 'jit'))
  compilation_cache_dir: str = _f('~/.cache/nsmae_jax/xla', 'Persistent XLA compilation cache '
                                  'set by the entry points at start-up (empty = off): a rerun '
                                  'skips compiling the step.')


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Label-efficient BEV map segmentation fine-tuning."""
  init_workdir: str = _f('', 'Pre-training workdir whose latest checkpoint initialises the '
                         'backbone (LiDAR + camera encoders, lifting, fusion); empty = from '
                         'scratch.')
  label_fraction: float = _f(1.0, 'Fraction of the training key frames whose labels are used, '
                             'in (0, 1]; a deterministic, seeded subset.', check=label_fraction)
  subset_seed: int = _f(0, 'Seed of the labelled subset (label fractions).')
  seg_loss: str = _f('focal', 'Segmentation loss: focal or bce.', check=one_of('focal', 'bce'))
  seg_head_channels: int = _f(64, 'Channels of the BEV segmentation head convolutions.')
  backbone_lr_scale: float = _f(1.0, 'Learning-rate multiplier of the backbone while '
                                'fine-tuning (the head keeps 1); 0 freezes the backbone (a probe '
                                'of the pre-trained features).', check=non_negative)
  modalities: str = _f('camera,lidar', 'Sensors the fine-tuned model reads: camera,lidar '
                       '(joint), camera or lidar. A single-modality model has no encoder for the '
                       'other sensor and never reads its input; the present encoders and fusion '
                       'layers restore from the joint pre-training (pre-training is always '
                       'joint).', check=one_of('camera,lidar', 'camera', 'lidar'))
  augment: bool = _f(False, 'Global BEV augmentation of the fine-tuning training examples: '
                     'per example a seeded rotation (|theta| <= 45 deg), x/y flips and scale '
                     '0.95-1.05 applied to points, boxes, map labels and cam2lidar together '
                     '(nsmae_jax.data.augment); evaluation is never augmented.')
  drop_modality: str = _f('', 'Evaluation with a sensor missing: camera (black images) or lidar '
                          '(no points) is fed to a joint model at eval time only; empty = off.',
                          check=lambda x: None if x in ('', 'camera', 'lidar') else
                          f'must be camera, lidar or empty, got {x!r}')


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
  """3D object detection fine-tuning: a CenterPoint-style head on the fused BEV map, scored by
  nuscenes-devkit's DetectionEval. Backbone init, label fraction and learning-rate scale come
  from the fine-tuning group."""
  det_resolution: float = _f(1.0, 'Cell size (m) of the detection head grid over [-E, E]^2 of '
                             'the LiDAR frame; the fused BEV map is resampled to it.',
                             check=positive)
  det_head_channels: int = _f(64, 'Channels of the detection head convolutions.', check=positive)
  det_min_overlap: float = _f(0.1, 'Heatmap targets: CenterPoint gaussian_radius min overlap, '
                              'in (0, 1).', check=lambda x: None if 0.0 < x < 1.0 else
                              f'must be in (0, 1), got {x}')
  det_min_radius: int = _f(2, 'Heatmap targets: smallest Gaussian radius (cells).',
                           check=non_negative)
  det_reg_weight: float = _f(0.25, 'Weight of the L1 box regression loss next to the heatmap '
                             'focal loss (CenterPoint: 0.25).', check=non_negative)
  det_top_k: int = _f(100, 'Detections kept per key frame after local-max pooling (the devkit '
                      'accepts at most 500).', check=lambda x: None if 1 <= x <= 500 else
                      f'must be in [1, 500], got {x}')
  det_score_threshold: float = _f(0.05, 'Detections below this score are not reported.',
                                  check=fraction)
  det_nms: str = _f('circle', 'Detection NMS: circle (CenterPoint class-wise centre distance) '
                    'or none.', check=one_of('circle', 'none'))
  det_eval_set: str = _f('val', 'Official nuScenes split DetectionEval scores (the converted '
                         'eval split must hold the same key frames).',
                         check=one_of('val', 'train', 'mini_val', 'mini_train'))
  det_eval_config: str = _f('detection_cvpr_2019', 'nuscenes-devkit detection eval config '
                            '(config_factory name).')


GROUPS = {'data': DataConfig, 'model': ModelConfig, 'render': RenderConfig, 'loss': LossConfig,
          'train': TrainConfig, 'finetune': FinetuneConfig,
          'detection': DetectionConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole configuration: one sub-config per flag group."""
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
  detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)

  # ---- derived geometry (the single place these are computed) ----
  @property
  def pillar_cells(self) -> int:
    """Pillar canvas cells per side: 2 E / pillar_size."""
    return int(round(2 * self.data.bev_half_extent / self.model.pillar_size))

  @property
  def volume_shape(self) -> tuple[int, int, int]:
    """Fused volume cells (X, Y, Z); X = Y = pillar_cells / volume_stride."""
    xy = self.pillar_cells // self.model.volume_stride
    return (xy, xy, self.model.volume_z_cells)

  @property
  def volume_bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((x_min, y_min, z_min), (x_max, y_max, z_max)) of the fused volume, LiDAR frame (m)."""
    e = self.data.bev_half_extent
    return (-e, -e, self.model.z_min), (e, e, self.model.z_max)

  @property
  def patch_grid(self) -> tuple[int, int]:
    """ViT tokens per camera (rows, cols)."""
    p = self.model.patch_size
    return self.data.image_height // p, self.data.image_width // p

  def replace(self, **overrides: Any) -> 'Config':
    """Returns a copy with fields replaced by flat name (`replace(num_train_steps=5)`)."""
    groups = {name: {} for name in GROUPS}
    for key, value in overrides.items():
      group = field_group(key)
      groups[group][key] = value
    return dataclasses.replace(self, **{
        g: dataclasses.replace(getattr(self, g), **kv) for g, kv in groups.items() if kv})

  def to_dict(self) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, dict[str, Any]]) -> 'Config':
    known = {g: {f.name for f in dataclasses.fields(c)} for g, c in GROUPS.items()}
    return cls(**{g: GROUPS[g](**{k: v for k, v in d.get(g, {}).items() if k in known[g]})
                  for g in GROUPS})

  def validate(self) -> 'Config':
    """Raises ConfigError('--flag: problem') for the first bad value; returns self.

    First every field's own check (declared next to the field), then the checks that relate
    fields (_CROSS_CHECKS). File-system checks (does --init_workdir exist?) belong to the entry
    points (experiments/flags.py), not to the configuration.
    """
    for group, field in all_fields():
      check = field.metadata.get('check')
      problem = check(getattr(getattr(self, group), field.name)) if check else None
      if problem:
        raise ConfigError(f'--{field.name}: {problem}')
    for name, check in _CROSS_CHECKS:
      problem = check(self)
      if problem:
        raise ConfigError(f'--{name}: {problem}')
    return self


def _divisible_by_patch(side: str) -> Callable[[Config], str | None]:
  def check(c: Config) -> str | None:
    value = getattr(c.data, side)
    if value % c.model.patch_size:
      return f'{value} is not divisible by --patch_size={c.model.patch_size}'
    return None
  return check


def _multiple(extent: float, step: float) -> bool:
  n = 2 * extent / step
  return abs(n - round(n)) <= 1e-6


def _pillar_size(c: Config) -> str | None:
  if not _multiple(c.data.bev_half_extent, c.model.pillar_size):
    return (f'2 * bev_half_extent ({2 * c.data.bev_half_extent}) is not a multiple of '
            f'{c.model.pillar_size}')
  return None


def _volume_stride(c: Config) -> str | None:
  if _multiple(c.data.bev_half_extent, c.model.pillar_size) and (
      c.pillar_cells % c.model.volume_stride):
    return f'{c.pillar_cells} pillar cells are not divisible by {c.model.volume_stride}'
  return None


def _bev_resolution(c: Config) -> str | None:
  if not _multiple(c.data.bev_half_extent, c.data.bev_resolution):
    return f'2 * bev_half_extent is not a multiple of {c.data.bev_resolution}'
  return None


# (flag named in the error, check of the whole config): relations between fields.
_CROSS_CHECKS: tuple[tuple[str, Callable[[Config], str | None]], ...] = (
    ('image_height', _divisible_by_patch('image_height')),
    ('image_width', _divisible_by_patch('image_width')),
    ('pillar_size', _pillar_size),
    ('volume_stride', _volume_stride),
    ('bev_resolution', _bev_resolution),
    ('z_max', lambda c: None if c.model.z_max > c.model.z_min else
     f'must be > --z_min ({c.model.z_min}), got {c.model.z_max}'),
    ('process_id', lambda c: None if 0 <= c.train.process_id < c.train.num_processes else
     f'must be in [0, {c.train.num_processes}), got {c.train.process_id}'),
    ('free_space_carving', lambda c: None if not c.render.free_space_carving or (
        c.render.sampling == 'lidar') else
     f'needs --sampling=lidar, got --sampling={c.render.sampling}'),
    ('synthetic_val_scenes', lambda c: None if not c.data.synthetic or (
        c.data.synthetic_val_scenes < c.data.synthetic_scenes) else
     f'must be in [0, --synthetic_scenes), got {c.data.synthetic_val_scenes}'),
)


def field_group(name: str) -> str:
  """The group ('data', 'model', ...) that owns the flat field `name`."""
  for group, cls in GROUPS.items():
    if name in {f.name for f in dataclasses.fields(cls)}:
      return group
  raise ConfigError(f'--{name}: unknown config field')


def all_fields() -> Sequence[tuple[str, dataclasses.Field]]:
  """(group, field) for every config field, in declaration order."""
  return [(g, f) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]
