"""dpnet stage 3: explanations of parts, classes and images, and the report."""

import dpnet  # noqa: F401 - its thread defaults are set before torch starts OpenMP
