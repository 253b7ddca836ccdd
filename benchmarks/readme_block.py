"""Write a measured block into the README between its two markers (the numbers stay the code's)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_block(start: str, end: str, text: str, readme: Path = README) -> None:
    """Replace what lies between ``start`` and ``end`` in ``readme`` with ``text``.

    Raises:
        SystemExit: the README lacks the markers (naming them).
    """
    body = readme.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", body,
                             flags=re.S))
