"""Stage 3's typed config: what a report (and an explanation) is asked for, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpnet.errors import ConfigError, check_options

# (test images, curve steps) of the measures that send images through the backbone again: quick
# (the report's default, in about the time of extraction on CUB-sized sets) and full
PIXEL_MEASURES = {"quick": (24, 4), "full": (200, 8)}


@dataclass
class AnalyzeConfig:
    """The report's and explain's options.

    Attributes:
        top_k: regions shown per part in the gallery.
        images: test images in the image view.
        boxes_csv: object boxes (image_name,xmin,ymin,xmax,ymax) for the pointing game.
        dask: run the training-set pass on dask: "local" or a scheduler address; None: in process.
        measures: a name of :data:`PIXEL_MEASURES` (how many images the pixel measures take).
        pixel_images, pixel_steps: in place of ``measures``' numbers when given.
        progress: progress bars.
    """

    top_k: int = 6
    images: int = 8
    boxes_csv: str | None = None
    dask: str | None = None
    measures: str = "quick"
    pixel_images: int | None = None
    pixel_steps: int | None = None
    progress: bool = True

    def pixel_plan(self) -> tuple[int, int]:
        """(test images, curve steps) of the pixel-space measures."""
        images, steps = PIXEL_MEASURES[self.measures]
        return (images if self.pixel_images is None else self.pixel_images,
                steps if self.pixel_steps is None else self.pixel_steps)

    def validate(self) -> "AnalyzeConfig":
        """Refuse values the analysis cannot take, naming the option (ConfigError)."""
        check_options([("--measures", self.measures, self.measures in PIXEL_MEASURES,
                        f"one of {', '.join(PIXEL_MEASURES)}")])
        images, steps = self.pixel_plan()
        check_options([("--pixel-steps", steps, steps >= 1, ">= 1"),
                       ("--pixel-images", images, images >= 0, ">= 0 (0 skips the pixel measures)"),
                       ("--top-k", self.top_k, self.top_k >= 1, ">= 1"), ("--images", self.images, self.images >= 0, ">= 0")])
        if self.boxes_csv is not None and not Path(self.boxes_csv).is_file():
            raise ConfigError(f"BOXES={self.boxes_csv} (--boxes-csv): no such file. Give a CSV with the columns "
                              f"image_name,xmin,ymin,xmax,ymax, or leave BOXES out")
        return self
