"""3D object detection fine-tuning of the NS-MAE backbone (CenterPoint-style head, scored by
nuscenes-devkit's DetectionEval)."""

from nsmae_jax.finetune.det3d.decode import Detections, circle_nms, decode, local_maxima
from nsmae_jax.finetune.det3d.head import CenterHead, DetModel, det_cells
from nsmae_jax.finetune.det3d.nusc import (boxes_to_global, evaluate, format_table,
                                           sample_results, write_results)
from nsmae_jax.finetune.det3d.targets import (Targets, center_targets, focal_loss,
                                              gaussian_radius, regression_loss)
from nsmae_jax.finetune.det3d.task import det3d_eval_batches, det3d_task

__all__ = ['Detections', 'circle_nms', 'decode', 'local_maxima', 'CenterHead', 'DetModel',
           'det_cells', 'boxes_to_global', 'evaluate', 'format_table', 'sample_results',
           'write_results', 'Targets', 'center_targets', 'focal_loss', 'gaussian_radius',
           'regression_loss', 'det3d_eval_batches', 'det3d_task']
