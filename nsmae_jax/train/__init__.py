"""Training: the pure steps, the pmap loop, orbax checkpoints and metric writers."""

from nsmae_jax.train.loop import NonFiniteLossError, TrainResult, train_and_evaluate
from nsmae_jax.train.task import Task

__all__ = ['NonFiniteLossError', 'Task', 'TrainResult', 'train_and_evaluate']
