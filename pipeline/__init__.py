"""ntk-sweep's orchestration: data, sweeps on Ray, results, aggregation and reports.

``pipeline.query(results, sql)`` runs DuckDB SQL over a results directory (see :mod:`pipeline.query`).
"""

from pipeline import query as query  # callable module: pipeline.query(results, sql)
