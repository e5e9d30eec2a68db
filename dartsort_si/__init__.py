"""dartsort-si: the DARTsort spike sorter as a SpikeInterface plugin.

`import dartsort_si` registers the sorter, so `si.run_sorter("dartsort", rec)` uses it.
"""

__version__ = "0.1.0"

from .analyzer import to_sorting_analyzer  # noqa: E402
from .config import DARTsortUserConfig, default_dartsort_cfg  # noqa: E402
from .motion_info import MotionInfo  # noqa: E402
from .sorting import DARTsortSorting  # noqa: E402
from .pipeline import DARTsortReturn, dartsort  # noqa: E402
from .sorter import DARTsortSorter, register  # noqa: E402

register()
from .components import register as _register_components  # noqa: E402

_register_components()

__all__ = ["dartsort", "DARTsortUserConfig", "DARTsortSorting", "MotionInfo", "DARTsortReturn",
           "DARTsortSorter", "default_dartsort_cfg", "to_sorting_analyzer"]
