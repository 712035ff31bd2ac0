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
import os
from typing import Any, Sequence


def _f(default: Any, help: str, **kw: Any) -> Any:  # pylint: disable=redefined-builtin
  """A dataclass field with a help string (becomes the absl flag's help)."""
  if isinstance(default, (list, dict)):
    return dataclasses.field(default_factory=lambda: type(default)(default),
                             metadata={'help': help, **kw})
  return dataclasses.field(default=default, metadata={'help': help, **kw})


class ConfigError(ValueError):
  """A bad configuration value; the message starts with the offending flag: `--name: ...`."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where data lives and what one example looks like."""
  data_dir: str = _f('data/tfds', 'TFDS data dir holding the converted `nuscenes_nsmae` dataset.')
  dataroot: str = _f('data/nuscenes_synthetic', 'nuScenes-format dataroot (real or synthetic) '
                     'that the converter reads.')
  version: str = _f('v1.0-trainval', 'nuScenes table version under the dataroot.')
  synthetic: bool = _f(True, 'If the dataset is missing, generate a synthetic nuScenes-format '
                       'world into --dataroot and convert it first (demo / CI path).')
  synthetic_scenes: int = _f(4, 'Synthetic world: number of scenes (when --synthetic).')
  synthetic_val_scenes: int = _f(1, 'Synthetic world: how many of those scenes are val.')
  synthetic_frames_per_scene: int = _f(10, 'Synthetic world: key frames per scene.')
  synthetic_seed: int = _f(0, 'Synthetic world: seed of the procedural town.')
  synthetic_image_width: int = _f(400, 'Synthetic world: native camera image width (px).')
  synthetic_image_height: int = _f(225, 'Synthetic world: native camera image height (px).')
  image_height: int = _f(64, 'Stored/model image height (px); images are resized to this.')
  image_width: int = _f(176, 'Stored/model image width (px).')
  num_sweeps: int = _f(1, 'LiDAR sweeps merged into each key frame (the key frame counts as 1; '
                       'nuScenes practice is 10).')
  max_points: int = _f(16384, 'Points per example after padding/subsampling (P).')
  max_boxes: int = _f(64, 'Boxes per example after padding (M).')
  bev_half_extent: float = _f(32.0, 'Half extent of the BEV map targets and of every BEV grid '
                              '(m): the grid spans [-E, E] in x and y of the LiDAR frame.')
  bev_resolution: float = _f(0.5, 'Cell size of the BEV map targets (m).')
  prefetch: int = _f(2, 'Batches prefetched to the devices.')
  convert_workers: int = _f(2, 'Worker processes used when converting a dataroot.')

  @property
  def bev_cells(self) -> int:
    """Cells along x (and y) of the BEV map target: 2 E / r."""
    return int(round(2 * self.bev_half_extent / self.bev_resolution))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Network sizes and geometry of the pillar canvas and the fused volume."""
  model_size: str = _f('demo', 'Named model size from nsmae_jax.models.MODEL_SIZES (demo, base); '
                       'the size overrides the encoder widths/depths below when they are 0.')
  patch_size: int = _f(8, 'ViT patch size (px); image height and width must be divisible by it.')
  vit_width: int = _f(0, 'ViT token width (0 = from --model_size).')
  vit_depth: int = _f(0, 'ViT transformer blocks (0 = from --model_size).')
  vit_heads: int = _f(0, 'ViT attention heads (0 = from --model_size).')
  pillar_size: float = _f(0.5, 'Pillar edge (m); the pillar canvas covers [-E, E]^2 of the BEV '
                          'extent, so 2E / pillar_size cells per side.')
  pillar_features: int = _f(0, 'PFN output channels (0 = from --model_size).')
  bev_channels: int = _f(0, 'Channels of the LiDAR BEV backbone and the fused BEV map '
                         '(0 = from --model_size).')
  volume_stride: int = _f(4, 'Fused volume cell = pillar_size * volume_stride (m) in x and y.')
  z_min: float = _f(-3.0, 'Bottom of the pillars and of the fused volume (m, LiDAR frame).')
  z_max: float = _f(3.0, 'Top of the pillars and of the fused volume (m, LiDAR frame).')
  volume_z_cells: int = _f(6, 'Cells of the fused volume along z.')
  volume_channels: int = _f(0, 'Channels of the fused 3D volume (0 = from --model_size).')
  image_mask_ratio: float = _f(0.5, 'Fraction of image patches masked per camera (MAE); '
                               'in [0, 1).')
  lidar_mask_ratio: float = _f(0.8, 'Fraction of non-empty pillars dropped per sample; '
                               'in [0, 1). The paper uses 0.7-0.9.')


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """The NeRF-style renderer and the rays drawn per step."""
  num_samples: int = _f(32, 'Stratified samples per ray between near and far.')
  perspective_rays: int = _f(1024, 'Perspective rays per example per step (half at pixels hit '
                             'by LiDAR points, with depth targets; half random, colour only).')
  bev_rays: int = _f(512, 'Top-down BEV rays per example per step.')
  pos_freqs: int = _f(6, 'Positional-encoding frequencies of the sample position.')
  dir_freqs: int = _f(4, 'Positional-encoding frequencies of the view direction.')
  field_width: int = _f(64, 'Hidden width of the field MLP.')
  field_depth: int = _f(2, 'Hidden layers of the field MLP.')
  near: float = _f(0.5, 'Near bound of perspective rays (m); far is where a ray leaves the '
                   'volume.')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights; 0 switches a term off (ablations)."""
  perspective_color_weight: float = _f(1.0, 'Weight of the perspective-view L2 colour loss.')
  perspective_depth_weight: float = _f(0.1, 'Weight of the perspective-view L1 depth loss '
                                       '(depth in m).')
  bev_color_weight: float = _f(1.0, 'Weight of the BEV-view L2 colour loss.')
  bev_depth_weight: float = _f(0.1, 'Weight of the BEV-view L1 depth loss (m).')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, logging and checkpointing."""
  workdir: str = _f('runs/demo', 'Directory for checkpoints, metrics.jsonl, TensorBoard events '
                    'and images. An existing workdir is resumed from its latest checkpoint.')
  num_train_steps: int = _f(300, 'Total optimisation steps.')
  per_device_batch_size: int = _f(1, 'Examples per device per step.')
  learning_rate: float = _f(1e-3, 'Peak learning rate (AdamW, warmup + cosine decay).')
  warmup_steps: int = _f(30, 'Linear warmup steps.')
  weight_decay: float = _f(0.01, 'AdamW weight decay.')
  grad_clip_norm: float = _f(1.0, 'Global gradient-norm clip (0 = off).')
  seed: int = _f(0, 'Seed of parameters, masks, rays and data order.')
  log_every_steps: int = _f(10, 'Steps between scalar logs (console, TensorBoard, metrics.jsonl).')
  checkpoint_every_steps: int = _f(100, 'Steps between orbax checkpoints.')
  eval_every_steps: int = _f(100, 'Steps between evaluations on the val split (0 = only at end).')
  image_every_steps: int = _f(100, 'Steps between rendered-image summaries.')
  eval_batches: int = _f(4, 'Val batches per evaluation (0 = the whole split).')
  max_to_keep: int = _f(3, 'Checkpoints kept.')
  half_precision: bool = _f(False, 'bfloat16 activations (for GPU/TPU).')
  coordinator_address: str = _f('', 'Multi-host: host:port of process 0 for '
                                'jax.distributed.initialize (empty = single host, or automatic on '
                                'TPU pods with --distributed).')
  num_processes: int = _f(1, 'Multi-host: number of processes.')
  process_id: int = _f(0, 'Multi-host: this process index.')
  distributed: bool = _f(False, 'Call jax.distributed.initialize() (automatic on TPU pods and '
                         'SLURM; uses the three flags above when given).')


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Label-efficient BEV map segmentation fine-tuning."""
  init_workdir: str = _f('', 'Pre-training workdir whose latest checkpoint initialises the '
                         'backbone (LiDAR + camera encoders, lifting, fusion); empty = from '
                         'scratch.')
  label_fraction: float = _f(1.0, 'Fraction of the training key frames whose labels are used, '
                             'in (0, 1]; a deterministic, seeded subset.')
  subset_seed: int = _f(0, 'Seed of the labelled subset (label fractions).')
  seg_loss: str = _f('focal', 'Segmentation loss: focal or bce.')
  seg_head_channels: int = _f(64, 'Channels of the BEV segmentation head convolutions.')
  backbone_lr_scale: float = _f(1.0, 'Learning-rate multiplier of the backbone while '
                                'fine-tuning (the head keeps 1); 0 freezes the backbone (a probe '
                                'of the pre-trained features).')


GROUPS = {'data': DataConfig, 'model': ModelConfig, 'render': RenderConfig, 'loss': LossConfig,
          'train': TrainConfig, 'finetune': FinetuneConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole configuration: one sub-config per flag group."""
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

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
    """Raises ConfigError('--flag: problem') for the first bad value; returns self."""
    d, m, r, t = self.data, self.model, self.render, self.train
    positive = [('per_device_batch_size', t.per_device_batch_size),
                ('num_train_steps', t.num_train_steps), ('image_height', d.image_height),
                ('image_width', d.image_width), ('num_sweeps', d.num_sweeps),
                ('max_points', d.max_points), ('max_boxes', d.max_boxes),
                ('patch_size', m.patch_size), ('num_samples', r.num_samples),
                ('log_every_steps', t.log_every_steps),
                ('checkpoint_every_steps', t.checkpoint_every_steps),
                ('volume_z_cells', m.volume_z_cells), ('volume_stride', m.volume_stride),
                ('num_processes', t.num_processes), ('synthetic_scenes', d.synthetic_scenes),
                ('synthetic_frames_per_scene', d.synthetic_frames_per_scene)]
    for name, value in positive:
      if value <= 0:
        raise ConfigError(f'--{name}: must be > 0, got {value}')
    non_negative = [('perspective_rays', r.perspective_rays), ('bev_rays', r.bev_rays),
                    ('warmup_steps', t.warmup_steps), ('eval_every_steps', t.eval_every_steps),
                    ('eval_batches', t.eval_batches), ('weight_decay', t.weight_decay),
                    ('grad_clip_norm', t.grad_clip_norm),
                    ('perspective_color_weight', self.loss.perspective_color_weight),
                    ('perspective_depth_weight', self.loss.perspective_depth_weight),
                    ('bev_color_weight', self.loss.bev_color_weight),
                    ('bev_depth_weight', self.loss.bev_depth_weight)]
    for name, value in non_negative:
      if value < 0:
        raise ConfigError(f'--{name}: must be >= 0, got {value}')
    if not t.learning_rate > 0:
      raise ConfigError(f'--learning_rate: must be > 0, got {t.learning_rate}')
    for name, value in [('image_mask_ratio', m.image_mask_ratio),
                        ('lidar_mask_ratio', m.lidar_mask_ratio)]:
      if not 0.0 <= value < 1.0:
        raise ConfigError(f'--{name}: must be in [0, 1), got {value}')
    for name, value in [('image_height', d.image_height), ('image_width', d.image_width)]:
      if value % m.patch_size:
        raise ConfigError(f'--{name}: {value} is not divisible by --patch_size={m.patch_size}')
    cells = 2 * d.bev_half_extent / m.pillar_size
    if abs(cells - round(cells)) > 1e-6:
      raise ConfigError(f'--pillar_size: 2 * bev_half_extent ({2 * d.bev_half_extent}) is not a '
                        f'multiple of {m.pillar_size}')
    if round(cells) % m.volume_stride:
      raise ConfigError(f'--volume_stride: {int(round(cells))} pillar cells are not divisible by '
                        f'{m.volume_stride}')
    bev = 2 * d.bev_half_extent / d.bev_resolution
    if abs(bev - round(bev)) > 1e-6:
      raise ConfigError(f'--bev_resolution: 2 * bev_half_extent is not a multiple of '
                        f'{d.bev_resolution}')
    if not m.z_max > m.z_min:
      raise ConfigError(f'--z_max: must be > --z_min ({m.z_min}), got {m.z_max}')
    if not 0.0 < self.finetune.label_fraction <= 1.0:
      raise ConfigError(f'--label_fraction: must be in (0, 1], got {self.finetune.label_fraction}')
    if self.finetune.backbone_lr_scale < 0:
      raise ConfigError('--backbone_lr_scale: must be >= 0, got '
                        f'{self.finetune.backbone_lr_scale}')
    if self.finetune.seg_loss not in ('focal', 'bce'):
      raise ConfigError(f'--seg_loss: must be focal or bce, got {self.finetune.seg_loss!r}')
    if self.finetune.init_workdir and not os.path.isdir(self.finetune.init_workdir):
      raise ConfigError(f'--init_workdir: directory {self.finetune.init_workdir!r} does not '
                        'exist (give a pre-training workdir, or an empty value for scratch)')
    if not 0 <= t.process_id < t.num_processes:
      raise ConfigError(f'--process_id: must be in [0, {t.num_processes}), got {t.process_id}')
    if not d.synthetic and not os.path.isdir(d.data_dir):
      raise ConfigError(f'--data_dir: directory {d.data_dir!r} does not exist (pass --synthetic '
                        'to generate the demo world there)')
    if d.synthetic and not 0 <= d.synthetic_val_scenes < d.synthetic_scenes:
      raise ConfigError(f'--synthetic_val_scenes: must be in [0, --synthetic_scenes), got '
                        f'{d.synthetic_val_scenes}')
    return self


def field_group(name: str) -> str:
  """The group ('data', 'model', ...) that owns the flat field `name`."""
  for group, cls in GROUPS.items():
    if name in {f.name for f in dataclasses.fields(cls)}:
      return group
  raise ConfigError(f'--{name}: unknown config field')


def all_fields() -> Sequence[tuple[str, dataclasses.Field]]:
  """(group, field) for every config field, in declaration order."""
  return [(g, f) for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]
