"""The built-in measures, registered as advlab.measures is imported."""

from advlab.measures.bounds import BOUNDS
from advlab.measures.density import DENSITY
from advlab.measures.health import HEALTH
from advlab.measures.lipschitz import LIPSCHITZ
from advlab.measures.masking import MASKING
from advlab.measures.registry import register
from advlab.measures.units import UNIT_ANALYSIS

BUILTIN = (LIPSCHITZ, UNIT_ANALYSIS, DENSITY, MASKING, HEALTH, BOUNDS)

for _defn in BUILTIN:
    register(_defn)
