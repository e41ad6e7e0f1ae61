"""PC-DARTS (Xu et al., ICLR 2020): every default of :class:`SearchMethod` is PC-DARTS."""

from .base import SearchMethod

METHOD = SearchMethod()
