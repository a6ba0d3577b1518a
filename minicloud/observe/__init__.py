"""Observability: the metric names every collector and document reads (:mod:`.names`) and the project-scoped query
service in front of the node's time-series database (:mod:`.query`). Collectors live in ``agent/metrics/``, the
TSDB supervisor in ``agent/tsdb.py``; ``docs/observability.md`` is the user's view."""
