"""The region-descriptor cache, in rooms: ``layout`` (the format), ``writer`` (one shard, atomic),
``chunks`` (chunk checks and the raw/mapped ``regions`` readers), ``location`` (local or fsspec)
and ``reader`` (:class:`RegionCache`). Publishing to another location is :mod:`dpnet.extract.publish`.
"""

from .layout import FIELDS, FORMAT, SPLITS, STORES, cache_identity, extract_command, field_specs, shard_path
from .location import is_url
from .reader import RegionCache, cache_name, check_compatible, resolve_cache, shard_problems
from .writer import ShardWriter, open_shard_writer

__all__ = ["FIELDS", "FORMAT", "SPLITS", "STORES", "RegionCache", "ShardWriter", "cache_identity", "cache_name",
           "check_compatible", "extract_command", "field_specs", "is_url", "open_shard_writer", "resolve_cache",
           "shard_path", "shard_problems"]
