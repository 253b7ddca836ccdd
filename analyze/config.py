"""Stage 3's typed config: what a report (and an explanation) is asked for, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpnet.errors import ConfigError
from dpnet.options import check_fields, option

# (test images, curve steps) of the measures that send images through the backbone again: quick
# (the report's default, in about the time of extraction on CUB-sized sets) and full
PIXEL_MEASURES = {"quick": (24, 4), "full": (200, 8)}


@dataclass
class AnalyzeConfig:
    """The report's and explain's options, each a field (:func:`dpnet.options.option`) with its help and
    range: the command line and :meth:`validate` are made from them."""

    top_k: int = option(6, "regions shown per part in the gallery", check=lambda v: v >= 1, want=">= 1")
    images: int = option(8, "test images in the image view", check=lambda v: v >= 0, want=">= 0")
    boxes_csv: str | None = option(None, "object boxes (image_name,xmin,ymin,xmax,ymax) for the pointing game",
                                   make="BOXES")
    dask: str | None = option(None, "run the training-set pass on dask: 'local' (a local cluster) or a distributed "
                                    "scheduler address (tcp://host:8786); None: in this process", make="DASK")
    measures: str = option("quick", "report: the pixel-space measures (stability, deletion, insertion) on "
                           + " or ".join(f"{n} test images in {s} steps ({k})" for k, (n, s) in PIXEL_MEASURES.items())
                           + "; each is given with its 95% interval", make="MEASURES", choices=tuple(PIXEL_MEASURES))
    pixel_images: int | None = option(None, "report: test images (a seeded sample) described again for the "
                                            "pixel-space measures, in place of --measures' number; 0 skips them, a "
                                            "large number takes every test image",
                                      check=lambda v: v is None or v >= 0, want=">= 0 (0 skips the pixel measures)")
    pixel_steps: int | None = option(None, "report: steps of the deletion / insertion curves, in place of "
                                           "--measures' number", check=lambda v: v is None or v >= 1, want=">= 1")
    progress: bool = option(True, "progress bars", cli=False)

    def pixel_plan(self) -> tuple[int, int]:
        """(test images, curve steps) of the pixel-space measures."""
        images, steps = PIXEL_MEASURES[self.measures]
        return (images if self.pixel_images is None else self.pixel_images,
                steps if self.pixel_steps is None else self.pixel_steps)

    def validate(self) -> "AnalyzeConfig":
        """Refuse values the analysis cannot take, naming the option (ConfigError)."""
        check_fields(self)
        if self.boxes_csv is not None and not Path(self.boxes_csv).is_file():
            raise ConfigError(f"BOXES={self.boxes_csv} (--boxes-csv): no such file. Give a CSV with the columns "
                              f"image_name,xmin,ymin,xmax,ymax, or leave BOXES out")
        return self
