"""The learner group: Ray actors forming one DeepSpeed ZeRO data-parallel group."""

from learner.ds_config import build_ds_config, grad_accum_steps, lr_multiplier
from learner.group import LearnerGroup

__all__ = ["LearnerGroup", "build_ds_config", "grad_accum_steps", "lr_multiplier"]
