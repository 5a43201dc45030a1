"""Search your own images: gallery indexes (`cir index`) and composed queries (`cir search`).

Works for every registered method through the CIRMethod contract (methods/base.py): gallery
images go through `image_representation` -> `targets_from_representation` once, at indexing
time; a query image goes through `image_representation` -> `queries_from_representation` with
its text; ranking uses the method's own `score` via ranking.rank_gallery (exact, stable).

The parts: storage.py (the index folder: format, load, atomic write), provenance.py (which
model an index was built with, and checking it at search time), encoding.py (gallery images to
features, skipping unreadable files), build.py (build_index / update_index), queries.py (reading,
encoding and running queries, recall, result files), backends.py (torch / faiss / approximate
ranking), ann.py (the approximate faiss indexes), html.py (the contact sheet and the thumbnail
and page head the report and the demo share).

Importing this package imports neither torch nor a model library (`cir index --dry-run` reads
IMAGE_SUFFIXES through it); they are imported inside the functions that need them.
"""

from cir_cli.search.backends import faiss_available, rank, rank_faiss
from cir_cli.search.build import IndexSummary, build_index, scan_folder, update_index
from cir_cli.search.encoding import encode_gallery
from cir_cli.search.html import render_html
from cir_cli.search.provenance import check_compatible, load_index_model
from cir_cli.search.queries import (
    Hit,
    Query,
    QueryResult,
    check_query_images,
    encode_queries,
    read_queries,
    recall_at,
    search,
    write_results,
)
from cir_cli.search.storage import Index, load_index

__all__ = [
    "Hit",
    "Index",
    "IndexSummary",
    "Query",
    "QueryResult",
    "build_index",
    "check_compatible",
    "check_query_images",
    "encode_gallery",
    "encode_queries",
    "faiss_available",
    "load_index",
    "load_index_model",
    "rank",
    "rank_faiss",
    "read_queries",
    "recall_at",
    "render_html",
    "scan_folder",
    "search",
    "update_index",
    "write_results",
]
