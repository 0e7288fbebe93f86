"""Imagenette (or any image folder) from archive to augmented batches on the training device.

    root = resolve_source("imagenette-160")          # download + verify + extract, once
    data = prepare(DataConfig(...))                   # decode once into a uint8 memmap cache
    for x, y in Loader(data.train, cfg, batch_size=64, train=True, device="cuda", seed=0): ...
"""

from patchbench.data.cache import (
                                        PreparedData,
                                        Split,
                                        holdout_split,
                                        load_prepared,
                                        prepare,
)
from patchbench.data.imagenette import (
                                        DATASETS,
                                        default_cache_dir,
                                        download_file,
                                        list_datasets,
                                        resolve_source,
                                        safe_extract,
)
from patchbench.data.loader import Loader

__all__ = [
    "DATASETS", "Loader", "PreparedData", "Split", "default_cache_dir", "download_file", "holdout_split",
    "list_datasets", "load_prepared", "prepare", "resolve_source", "safe_extract",
]
