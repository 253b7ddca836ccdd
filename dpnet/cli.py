"""The ``dpnet`` command: one entry to every stage, with the options of the make targets.

    dpnet extract --dataset cub --data-dir /data/CUB_200_2011     (make extract DATASET=cub DATA_DIR=...)
    dpnet train [--cache NAME] [--preset paper]                    (make train)
    dpnet ablation [--cache NAME]                                  (make ablation)
    dpnet report [--run NAME]                                      (make report)
    dpnet explain photo.jpg [--run NAME]                           (make explain IMG=photo.jpg)
    dpnet publish data/cache/NAME s3://bucket/caches/NAME          (python -m dpnet.extract.publish)

``dpnet COMMAND --help`` lists a command's options.
"""

from __future__ import annotations

import sys


def _extract(argv: list[str]) -> int:
    from dpnet.extract.cli import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from dpnet.train.cli import main

    return main(argv)


def _ablation(argv: list[str]) -> int:
    from dpnet.train.cli import main

    return main(["--ablation", *argv])


def _report(argv: list[str]) -> int:
    from dpnet.analyze.cli import main

    return main(["report", *argv])


def _explain(argv: list[str]) -> int:
    from dpnet.analyze.cli import main

    return main(["explain", *argv])


def _publish(argv: list[str]) -> int:
    from dpnet.extract.publish import main

    return main(argv)


COMMANDS = {"extract": _extract, "train": _train, "ablation": _ablation, "report": _report, "explain": _explain,
            "publish": _publish}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (dpnet --help)", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
