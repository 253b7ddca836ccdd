"""The pages' templates (``analyze/templates``, jinja2 with autoescape) and the filters they use.

Structure and prose live in the templates, reviewable apart from the data; every value the
code hands them (class and file names included) is escaped by jinja2.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def num(v: Any, digits: int = 2) -> str:
    """A number as the page shows it: ``digits`` decimals, n/a for NaN or None, a sentence for infinity."""
    if v is None:
        return "n/a"
    if isinstance(v, (float, np.floating)):
        if math.isinf(float(v)):
            return "\u221e (random removal: no drop above 0.1%)"
        return "n/a" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)


def cut(text: Any, limit: int | None = None) -> str:
    """A dataset-derived string cut to ``limit`` characters (the page escapes it)."""
    text = str(text)
    return text[:limit - 1] + "\u2026" if limit is not None and len(text) > limit else text


def templates():
    """The jinja2 environment of dpnet's pages: every value escaped, an unknown name an error."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("dpnet.analyze", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = num
    return env
