"""Label-efficient fine-tuning of the NS-MAE backbone: BEV map segmentation and (det3d) 3D
object detection."""

from nsmae_jax.finetune.head import BEVSegHead, BEVSegModel, seg_loss
from nsmae_jax.finetune.metrics import (MAP_CLASSES, THRESHOLDS, confusion_counts, format_table,
                                        summarize)
from nsmae_jax.finetune.task import bevseg_task, init_from_pretrained
# After .task: det3d's task imports init_from_pretrained from it.
from nsmae_jax.finetune.det3d import det3d_eval_batches, det3d_task

__all__ = ['BEVSegHead', 'BEVSegModel', 'seg_loss', 'MAP_CLASSES', 'THRESHOLDS',
           'confusion_counts', 'format_table', 'summarize', 'bevseg_task', 'init_from_pretrained',
           'det3d_eval_batches', 'det3d_task']
