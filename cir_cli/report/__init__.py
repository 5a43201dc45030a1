"""`cir validate --report`: a self-contained HTML page of a validation run and its modality
audit (audit.py: per-query data; html.py: the page). Imported only when --report is given."""

from cir_cli.report.audit import (
    QueryRecord,
    SplitReport,
    audit_table,
    evaluate_with_report,
)
from cir_cli.report.html import render_report

__all__ = ["QueryRecord", "SplitReport", "audit_table", "evaluate_with_report", "render_report"]
