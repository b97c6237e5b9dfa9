"""Turning runs into something to read: sweep tables, Pareto plots and pictures of merges."""

from spatialmerge.adapters.schedule import label, method_label, schedule_text
from spatialmerge.reporting.pareto import pareto_front, plot_pareto
from spatialmerge.reporting.table import (
    COLUMNS,
    accuracy,
    build_rows,
    collect_results,
    markdown_table,
    write_report,
)

__all__ = [
    "COLUMNS",
    "accuracy",
    "build_rows",
    "collect_results",
    "label",
    "markdown_table",
    "method_label",
    "pareto_front",
    "plot_pareto",
    "schedule_text",
    "write_report",
]
