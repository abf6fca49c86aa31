"""Training data: built-in sets, image folders, ``.npy``/``.npz`` arrays, tar shards, Hugging
Face datasets and prepared folders.

Layout: :mod:`.sources` opens what ``--data`` names as a :class:`Dataset` (small built-in sets
in memory; files through a reader that gives one uint8 image at a time), :mod:`.arrays`
memory-maps arrays (converting others to a uint8 cache once), :mod:`.images` decodes image
files, :mod:`.hf` reads Hugging Face ``datasets`` folders and parquet (with pyarrow, an optional
extra), :mod:`.shards` names and indexes tar shards (read like a folder), :mod:`.stream` reads
``pipe:`` shards as streams split across ranks and workers, :mod:`.fingerprint` names the
data a run was trained on, :mod:`.points` draws the 2-D sets, :mod:`.prepare` (with
:mod:`.shard_writer`) writes prepared folders, and :mod:`.loader` turns a Dataset into this
rank's batches of an endless, resumable shuffled stream.
"""

from .fingerprint import data_path, fingerprint
from .images import IMAGE_EXTENSIONS, to_uint8, u8_to_float
from .loader import Batch, DataOrder, Loader, random_flip, rank_rows
from .points import POINT_CLASS_NAMES, sample_labelled_points, sample_points
from .sources import BUILTIN_SETS, Dataset, DataWarning, load_data

__all__ = [
    "BUILTIN_SETS",
    "IMAGE_EXTENSIONS",
    "POINT_CLASS_NAMES",
    "Batch",
    "DataOrder",
    "DataWarning",
    "Dataset",
    "Loader",
    "data_path",
    "fingerprint",
    "load_data",
    "random_flip",
    "rank_rows",
    "sample_labelled_points",
    "sample_points",
    "to_uint8",
    "u8_to_float",
]
