"""Sample selectors: which training samples each epoch uses, with which per-sample KD weight.
``build.build_selector`` picks one by name; SAKD lives in ``sakd``, its control (a seeded random
subset) in ``random_subset``. Importing the package loads only the interface and ``FullData`` (the
teacher's stage needs no more)."""

from kdcompress.training.selection.base import SampleSelector
from kdcompress.training.selection.full import FullData

__all__ = ["SampleSelector", "FullData"]
