"""The built-in measures, registered as advlab.measures is imported."""

from advlab.measures.bounds import BOUNDS
from advlab.measures.density import DENSITY
from advlab.measures.health import HEALTH
from advlab.measures.jacobian import JACOBIAN
from advlab.measures.likelihood import LIKELIHOOD
from advlab.measures.lipschitz import LIPSCHITZ
from advlab.measures.masking import MASKING
from advlab.measures.registry import register
from advlab.measures.units import UNIT_ANALYSIS

BUILTIN = (LIPSCHITZ, UNIT_ANALYSIS, DENSITY, MASKING, HEALTH, BOUNDS, JACOBIAN, LIKELIHOOD)

for _defn in BUILTIN:
    register(_defn)
