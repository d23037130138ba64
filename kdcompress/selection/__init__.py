from kdcompress.selection.base import SampleSelector
from kdcompress.selection.full import FullData
from kdcompress.selection.sakd import SAKDSelector

__all__ = ["SampleSelector", "FullData", "SAKDSelector"]
