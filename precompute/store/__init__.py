"""The store: the only package that imports duckdb. The server reads through `Store`; the precompute
pipeline (precompute/pipeline/, whose working directory holds the streamed activations) writes the store through
`write.build_range` and `StoreBuilder`."""

from ..errors import UnknownSAE
from .read import Example, Explanation, Feature, FeatureRow, Group, SAEInfo, SearchHit, Store, StoredGraph, StoreError
from .schema import SCHEMA_VERSION

__all__ = ["Store", "StoreError", "SAEInfo", "Feature", "FeatureRow", "Example", "Explanation", "Group", "SearchHit", "StoredGraph", "SCHEMA_VERSION",
           "UnknownSAE"]
