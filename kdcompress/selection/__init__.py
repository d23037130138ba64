from kdcompress.selection.base import SampleSelector
from kdcompress.selection.full import FullData

__all__ = ["SampleSelector", "FullData"]
