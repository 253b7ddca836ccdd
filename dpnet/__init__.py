"""dpnet: what every stage shares (errors, files, devices) and the ``dpnet`` console command.

The stages are the packages ``extract`` (stage 1), ``train`` (stage 2) and ``analyze``
(stage 3); imports flow dpnet -> extract -> train -> analyze.
"""

__version__ = "0.2.0"
