"""Input data: validated .npy reading, transforms, grain pipelines, demo and synthetic sets."""

from hw8jax.data.inputs import RunData, open_run_data
from hw8jax.data.io import (
    TEST_FILE,
    TRAIN_FILE,
    DataError,
    fingerprint,
    open_images,
    open_labels,
    write_npy_atomic,
)
from hw8jax.data.pipeline import (
    Shard,
    eval_dataset,
    num_held_out,
    steps_per_epoch,
    train_dataset,
    validation_split,
)
from hw8jax.data.transforms import crop, crop_transform, get_transform, normalize

__all__ = [
    "TEST_FILE", "TRAIN_FILE", "DataError", "RunData", "Shard", "crop", "crop_transform",
    "eval_dataset", "fingerprint", "get_transform", "normalize", "num_held_out", "open_images",
    "open_labels", "open_run_data", "steps_per_epoch", "train_dataset", "validation_split",
    "write_npy_atomic",
]
