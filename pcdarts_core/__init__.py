"""Pure-PyTorch core of the DARTS family: search space, supernets, methods, genotypes, networks, data, loops.

Nothing here imports Ray: the orchestrator imports this package, never the reverse.
"""

from . import methods  # noqa: F401 - registers the search methods with pcdarts_core.config
from .genotypes import PUBLISHED, Genotype, derive_genotype, parse_genotype
from .ops import PRIMITIVES

__all__ = ["PRIMITIVES", "PUBLISHED", "Genotype", "derive_genotype", "parse_genotype"]
