"""dartsort-si: the DARTsort spike sorter as a SpikeInterface plugin.

`import dartsort_si` registers the sorter, so `si.run_sorter("dartsort", rec)` uses it.
"""

__version__ = "0.1.0"

import os

# oneDNN (torch's CPU convolutions) keeps a compiled primitive per input shape, up to 1024 of
# them, and peeling's batches change size round after round: a 300 s x 128 ch sort grew by
# 0.8 GB during subtraction. Over 60 chunks of it (one worker), RSS went 0.89 -> 1.65 GB with
# 1024 primitives (22.6 s), and stayed at 0.86-0.95 GB with 0, 32 or 64 (18.8, 21.8, 20.0 s);
# with none, matching rebuilt its big grouped convolutions every round (+2 s on 60 s x 128 ch).
# oneDNN reads this once, at the process's first convolution; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from .analyzer import to_sorting_analyzer  # noqa: E402
from .config import DARTsortUserConfig, default_dartsort_cfg  # noqa: E402
from .motion_info import MotionInfo  # noqa: E402
from .sorting import DARTsortSorting  # noqa: E402
from .pipeline import DARTsortReturn, dartsort  # noqa: E402
from .sorter import SORTER_NAME, DARTsortSorter, register  # noqa: E402

register()
from .components import register as _register_components  # noqa: E402

_register_components()

__all__ = ["dartsort", "DARTsortUserConfig", "DARTsortSorting", "MotionInfo", "DARTsortReturn",
           "DARTsortSorter", "SORTER_NAME", "default_dartsort_cfg", "to_sorting_analyzer"]
