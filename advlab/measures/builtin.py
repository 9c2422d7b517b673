"""The built-in measures, registered when the registry is first asked (advlab.measures.registry)."""

from advlab.measures.density import DENSITY
from advlab.measures.lipschitz import LIPSCHITZ
from advlab.measures.masking import MASKING
from advlab.measures.registry import register
from advlab.measures.units import UNIT_ANALYSIS

for _defn in (LIPSCHITZ, UNIT_ANALYSIS, DENSITY, MASKING):
    register(_defn)
