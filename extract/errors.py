"""Deprecated location: the errors live in :mod:`dpnet.errors`."""

from dpnet.errors import *  # noqa: F401,F403
