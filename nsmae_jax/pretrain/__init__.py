"""NS-MAE pre-training: the model (backbone + radiance field), rays and targets drawn in one
place, the losses, and the Task the generic training loop runs.

model.py     NSMAE: encode (masked) inputs into the fused volume and BEV map, render them
             (perspective view: the volume; BEV view: the BEV map) over a learned background
targets.py   rays and their colour/depth targets from the unmasked batch (step and full view)
losses.py    L2 colour + L1 depth per view, weighted; hidden (masked) targets scored or
             weighted up per --masked_loss; eval with and without masking; full-view renders
task.py      pretrain_task(config) for nsmae_jax.train.train_and_evaluate
"""

from nsmae_jax.pretrain.losses import pretrain_loss, render_views
from nsmae_jax.pretrain.model import NSMAE, build_pretrain_model, param_groups
from nsmae_jax.pretrain.task import pretrain_task

__all__ = ['pretrain_loss', 'render_views', 'NSMAE', 'build_pretrain_model', 'param_groups',
           'pretrain_task']
