"""The storage layer: the only package that speaks SQL or knows a file layout of the workspace.

Modules, one concern each:

- ``workspace``: the workspace directory, its locks, catalog connections, schema and migrations;
- ``keys``: :class:`RunKey`, the (model, dataset, condition) every stage passes around;
- ``parts``: Parquet schemas of embedding parts and neighbour files, and the atomic writer;
- ``views``: the ``embeddings``/``neighbors`` views and the rule that picks an image's current row;
- ``embeddings``: the one reader of a run's embeddings, pending images, part commits, ``runs``;
- ``fingerprints``: fingerprints of a result's inputs and the one rule for "is it current";
- ``dependencies``: the declared table of what is computed from what, and the cascade it drives;
- ``datasets`` / ``conditions`` / ``results``: reads and writes of the catalog's tables;
- ``sandbox``: the confined connection ``vlmindex sql`` runs on;
- ``shipped``: the shipped ``.sql`` analyses.
"""

from vlmindex.catalog.keys import CLEAN, RunKey
from vlmindex.catalog.workspace import Workspace, slug, sql_dir

__all__ = ["CLEAN", "RunKey", "Workspace", "slug", "sql_dir"]
