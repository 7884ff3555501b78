"""Networks and their facts: building one by name, input size, Grad-CAM layer, features, checkpoints.

    from models import build_model, load_classifier, save_checkpoint
"""
from models.build import MODEL_NAMES, Classifier, build_model, load_classifier
from models.checkpoint import (ModelError, check_resumable, checkpoint_dict, load_checkpoint, restore_rng, rng_state,
                               save_checkpoint, unwrap)
from models.lenet import LeNet
from models.optim import LARS, OPTIMIZERS, make_optimizer, warmup_cosine
from models.runtime import autocast, select_device, setup_distributed, to_device

__all__ = ["MODEL_NAMES", "Classifier", "ModelError", "build_model", "check_resumable", "checkpoint_dict",
           "load_checkpoint", "load_classifier", "save_checkpoint", "unwrap", "LeNet", "autocast", "select_device",
           "to_device", "rng_state", "restore_rng", "LARS", "OPTIMIZERS", "make_optimizer", "warmup_cosine", "setup_distributed"]
