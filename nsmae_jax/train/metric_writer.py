"""Where metrics go: metrics.jsonl, TensorBoard event files, PNG images, console progress.

Event files are written with tensorboard's record framing and protos directly: its
EventFileWriter would import TensorFlow through tensorboard.compat (seconds at start-up).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import numpy as np


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """[H, W] (colour-mapped) or [H, W, 3] float in [0, 1] -> uint8 [H, W, 3]."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
    valid = image > 0
    hi = float(np.percentile(image[valid], 99)) if valid.any() else 1.0
    image = colormaps['turbo'](np.clip(image / max(hi, 1e-6), 0, 1))[..., :3] * valid[..., None]
  return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class _EventFile:
  """A TensorBoard event file (TFRecord framing of tensorboard Event protos), no TensorFlow."""

  def __init__(self, logdir: str):
    import socket  # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}'
    self._writer = RecordWriter(open(os.path.join(logdir, name), 'wb'))
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add_event(self, event) -> None:
    self._writer.write(event.SerializeToString())

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Writes scalars (jsonl + TensorBoard) and images (PNG + TensorBoard) of process 0."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self.jsonl = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    os.makedirs(os.path.join(workdir, 'images'), exist_ok=True)
    self._truncate_after(resume_step)
    self._tb = _EventFile(os.path.join(workdir, 'tensorboard'))

  def _truncate_after(self, step: int) -> None:
    """On resume, drops lines logged after the restored checkpoint; they will be re-logged."""
    if not os.path.exists(self.jsonl):
      return
    with open(self.jsonl) as f:
      lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get('step', 0) <= step]
    if len(kept) != len(lines):
      with open(self.jsonl + '.tmp', 'w') as f:
        f.writelines(kept)
      os.replace(self.jsonl + '.tmp', self.jsonl)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = '') -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({f'{prefix}{k}': float(v) for k, v in values.items()})
    with open(self.jsonl, 'a') as f:
      f.write(json.dumps(record) + '\n')
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._event(step, [summary_pb2.Summary.Value(tag=f'{prefix}{k}', simple_value=float(v))
                       for k, v in values.items()])

  def _event(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                       summary=summary_pb2.Summary(value=values)))
    self._tb.flush()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
    """Writes each image as PNG under workdir/images/ and to TensorBoard; returns the paths."""
    if not self.enabled:
      return []
    import io  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    paths, values = [], []
    for name, image in images.items():
      rgb = _to_uint8(image)
      path = os.path.join(self.workdir, 'images', f'{name}_{int(step):06d}.png')
      Image.fromarray(rgb).save(path)
      paths.append(path)
      buf = io.BytesIO()
      Image.fromarray(rgb).save(buf, format='PNG')
      values.append(summary_pb2.Summary.Value(tag=name, image=summary_pb2.Summary.Image(
          height=rgb.shape[0], width=rgb.shape[1], colorspace=3,
          encoded_image_string=buf.getvalue())))
    self._event(step, values)
    return paths

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Console progress lines: step, loss, steps/s, ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self._t0, self._s0 = time.time(), start_step

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    elapsed = max(time.time() - self._t0, 1e-9)
    rate = (step - self._s0) / elapsed
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    eta_s = f'{int(eta // 60)}m{int(eta % 60):02d}s' if np.isfinite(eta) else '?'
    parts = [f'step {step}/{self.total}', f'loss {metrics.get("loss", float("nan")):.4f}']
    parts += [f'{k} {metrics[k]:.3f}' for k in ('perspective_psnr', 'bev_psnr', 'miou')
              if k in metrics]
    parts += [f'{rate:.2f} steps/s', f'ETA {eta_s}']
    return ' | '.join(parts)

  def print(self, step: int, metrics: Mapping[str, float]) -> None:
    if self.enabled:
      print(self.line(step, metrics), flush=True, file=sys.stdout)
