"""Label-efficient BEV map segmentation fine-tuning of the NS-MAE backbone."""

from nsmae_jax.finetune.head import BEVSegHead, BEVSegModel, seg_loss
from nsmae_jax.finetune.metrics import (MAP_CLASSES, THRESHOLDS, confusion_counts, format_table,
                                        summarize)
from nsmae_jax.finetune.task import bevseg_task, init_from_pretrained

__all__ = ['BEVSegHead', 'BEVSegModel', 'seg_loss', 'MAP_CLASSES', 'THRESHOLDS',
           'confusion_counts', 'format_table', 'summarize', 'bevseg_task', 'init_from_pretrained']
