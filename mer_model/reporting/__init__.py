"""Reports: per-experiment HTML (metrics, confusion matrices, per-subject/per-dataset bars, learning curves) and the
cross-experiment comparison table. Pure matplotlib/pandas; the caller logs the files to MLflow."""

from mer.model.reporting.compare import comparison_table, paired_table, write_comparison_report
from mer.model.reporting.experiment import write_experiment_report

__all__ = ["comparison_table", "paired_table", "write_comparison_report", "write_experiment_report"]
