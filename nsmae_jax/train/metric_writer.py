"""Where metrics go: metrics.jsonl, TensorBoard (tensorboardX), PNG images, a tqdm progress bar.

metrics.jsonl (one JSON object per line: 'step', 'time' and the metric names, eval metrics
prefixed 'eval_') is what other code and the docs read; its keys do not change. tensorboardX
writes the event files without importing TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Sequence

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


class MetricWriter:
  """Writes scalars (jsonl + TensorBoard) and images (PNG + TensorBoard) of process 0."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.workdir = workdir
    self.jsonl = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.join(workdir, 'images'), exist_ok=True)
    self._truncate_after(resume_step)
    # purge_step: TensorBoard hides the events an earlier (killed) run logged after the
    # checkpoint this run resumed from; they are logged again.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=resume_step or None, flush_secs=30)

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
    for k, v in values.items():
      self._tb.add_scalar(f'{prefix}{k}', float(v), int(step))
    self._tb.flush()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
    """Writes each image as PNG under workdir/images/ and to TensorBoard; returns the paths."""
    if not self.enabled:
      return []
    from PIL import Image  # pylint: disable=import-outside-toplevel
    paths = []
    for name, image in images.items():
      rgb = _to_uint8(image)
      path = os.path.join(self.workdir, 'images', f'{name}_{int(step):06d}.png')
      Image.fromarray(rgb).save(path)
      paths.append(path)
      self._tb.add_image(name, rgb, int(step), dataformats='HWC')
    self._tb.flush()
    return paths

  def close(self) -> None:
    """Flushes and closes the event file (joins tensorboardX's writer thread)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """A tqdm bar over the train steps (rate, ETA); its postfix shows the task's headline metrics.

  `headline` names metrics: each is shown from the latest train log when the train metrics have
  it, and as 'eval_<name>' from the latest eval. Messages go through tqdm.write (stdout), so they
  do not tear the bar (stderr).
  """

  def __init__(self, total_steps: int, start_step: int, headline: Sequence[str],
               enabled: bool = True, desc: str = ''):
    import tqdm  # pylint: disable=import-outside-toplevel
    self._tqdm = tqdm
    self.headline = tuple(headline)
    self.enabled = enabled
    self.postfix: dict[str, str] = {}
    # Redirected to a file, a bar redrawn ten times a second is a log of carriage returns.
    interactive = getattr(sys.stderr, 'isatty', lambda: False)()
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, unit='step',
                          disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                          mininterval=0.1 if interactive else 10.0)

  def advance(self, step: int) -> None:
    """The bar now stands at `step` (steps done)."""
    if self.enabled and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def _show(self, metrics: Mapping[str, float], prefix: str) -> None:
    for name in self.headline:
      if name in metrics:
        self.postfix[prefix + name] = f'{float(metrics[name]):.4g}'
    if self.enabled:
      self._bar.set_postfix(self.postfix, refresh=False)

  def train(self, step: int, metrics: Mapping[str, float]) -> None:
    self.advance(step)
    self._show(metrics, '')

  def eval(self, step: int, metrics: Mapping[str, float]) -> None:
    self._show(metrics, 'eval_')
    self.write(f'eval @ {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))

  def write(self, message: str) -> None:
    if self.enabled:
      self._tqdm.tqdm.write(message, file=sys.stdout)
      sys.stdout.flush()

  def close(self) -> None:
    self._bar.close()
