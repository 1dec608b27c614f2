"""`stayaligned report STUDY_DIR`: report.md and a self-contained report.html from a study's
stage files (never a model).

  study_files.py   read the study directory into one object; missing or failed stages kept
  tables.py        rates with intervals, differences against the reference cell, the
                   per-model summary rows, the Pareto front
  plots.py         matplotlib figures (Agg canvas, no pyplot state) -> PNG bytes
  pooling.py       seeds x items cluster bootstrap: pooled rates, kept shares, differences
  groups.py        a cell's seed runs pooled for the plots; one colour per cell
  headline.py      the headline rows (per fine-tune, within one template) and recommendation
  sections.py      headline, study in words, templates, judges (kappa), dose sections
  document.py      a tiny document model rendered to Markdown and to HTML
  report.py        the report's sections; write_report and summary_rows
"""
