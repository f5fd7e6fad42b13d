"""The lecture's ablation table on tiny-shapes: the backbones compared (backbones.py), how a run is
scored (scoring.py), the runner with its variants and budget (runner.py), and the table (report.py)."""
