"""Networks and everything about running them, shared by every script:

    build.py       building a network by name (LeNet or any torchvision classifier) and its facts
    checkpoint.py  the one checkpoint format: save, load, initialise from, resume
    predict.py     how a network sees an image; batched inference, test-time views, temperature
    optim.py       parameter groups, optimizers (LARS), warm-up + cosine schedule, weight EMA
    runtime.py     device, bf16, channels_last, torchrun/DDP, placing tensors, seeds, per-epoch index batches
    ood.py         out-of-distribution scores (kNN, energy, MSP, Mahalanobis on 1+ stages) and their gate
    rundir.py      history.csv, curves and figures as PNG, mean ± std tables, the run directory's lock

    from models import build_model, load_classifier, predict, select_runtime
"""
from models.build import INPUT_SIZE, Classifier, build_model, load_classifier, model_names
from models.checkpoint import (ModelError, check_resumable, checkpoint_dict, find_checkpoint, find_checkpoints,
                               init_file, load_checkpoint, photos_seen, refuse_init_that_saw, resume, save_checkpoint,
                               training_state, unwrap)
from models.lenet import LeNet
from models.optim import EMA, LARS, LEARNING_RATE, OPTIMIZERS, make_optimizer, param_groups, warmup_cosine
from models.ood import (GATE_SCORE, SCORES, detection_metrics, fit_reference, gate, gate_by, is_current, ood_scores,
                        reference_for, reference_from_images)
from models.predict import (MEAN, PLAIN_VIEW, STD, TTA_VIEWS, capture_features, crop, device_logits, embed,
                            fit_temperature, logits_and_features, normalize, predict, predict_logits, probabilities,
                            resize_size, to_input, view)
from models.rundir import (SaveClock, claim_run_dir, drawable, mean_std, mean_std_table, output_folder, png_bytes,
                           save_figure, write_history)
from models.runtime import (MEMORY_FORMATS, PRECISION_HELP, PRECISIONS, Runtime, backend_for, batch_indices, constant,
                            derived_seed, distributed, epoch_generators, native_bf16, per_rank_batch, seed_worker,
                            select_runtime, send, set_numerics, set_seed, shard)

__all__ = ["INPUT_SIZE", "Classifier", "build_model", "load_classifier", "model_names", "ModelError", "check_resumable",
           "checkpoint_dict", "find_checkpoint", "find_checkpoints", "init_file", "load_checkpoint", "photos_seen",
           "refuse_init_that_saw", "resume", "save_checkpoint", "training_state", "unwrap", "LeNet", "EMA", "LARS",
           "LEARNING_RATE", "OPTIMIZERS", "make_optimizer", "param_groups", "warmup_cosine", "GATE_SCORE", "SCORES",
           "gate_by", "detection_metrics", "fit_reference", "gate", "is_current", "ood_scores", "reference_for",
           "reference_from_images", "MEAN", "PLAIN_VIEW", "STD", "TTA_VIEWS", "capture_features", "crop",
           "device_logits", "embed", "fit_temperature", "logits_and_features", "normalize", "predict", "predict_logits",
           "probabilities", "resize_size", "to_input", "view", "SaveClock", "claim_run_dir", "drawable",
           "output_folder", "mean_std", "mean_std_table", "png_bytes", "save_figure", "write_history", "MEMORY_FORMATS",
           "PRECISION_HELP", "PRECISIONS", "Runtime", "backend_for", "batch_indices", "constant", "derived_seed",
           "distributed", "epoch_generators", "native_bf16", "per_rank_batch", "seed_worker", "select_runtime", "send",
           "set_numerics", "set_seed", "shard"]
