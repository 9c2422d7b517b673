"""The built-in measures, registered as advlab.measures is imported."""

from advlab.measures.bounds import BOUNDS
from advlab.measures.density import DENSITY
from advlab.measures.gaussian_noise import GAUSSIAN_NOISE
from advlab.measures.health import HEALTH
from advlab.measures.input_gradients import INPUT_GRADIENTS
from advlab.measures.jacobian import JACOBIAN
from advlab.measures.likelihood import LIKELIHOOD
from advlab.measures.lipschitz import LIPSCHITZ
from advlab.measures.masking import MASKING
from advlab.measures.registry import register
from advlab.measures.units import UNIT_ANALYSIS

BUILTIN = (
    LIPSCHITZ, UNIT_ANALYSIS, DENSITY, MASKING, HEALTH, BOUNDS, INPUT_GRADIENTS, GAUSSIAN_NOISE,
    JACOBIAN, LIKELIHOOD,
)  # fmt: skip

for _defn in BUILTIN:
    register(_defn)
