"""``vlmindex serve``: a read-only nearest-neighbour service and page over one workspace.

``service`` holds the logic (snapshots of verified indexes, loaded models, thumbnails, limits);
``scan`` the compiled scan of a flat index; ``app`` is the FastAPI skin; ``server`` runs it (one
process, or N workers); ``page.html`` the page at ``/``.
"""

from vlmindex.serve.service import Limits, NeighbourService

__all__ = ["Limits", "NeighbourService", "create_app"]


def create_app(service: NeighbourService):  # noqa: ANN201 - FastAPI is an optional extra
    from vlmindex.serve.app import create_app as make

    return make(service)
