"""person_retrieval: a Jupyter-first, reproducible companion to five person-retrieval papers.

Subpackages: :mod:`.world` (the procedural pedestrian world), :mod:`.datasets` (the real on-disk
formats), :mod:`.metrics` (Rank-k, mAP, mINP, dialogue metrics), :mod:`.config` (scales, paths, seeds),
:mod:`.reports` (paper-vs-this-run tables and figures).
"""
__version__ = "0.1.0"
