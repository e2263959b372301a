"""Checkpoint scans: one job per checkpoint, one MLflow parent run per scan, one summary at the end.

    python run.py -m mode=loss ckpt='glob:outputs/train_eval/*/checkpoints/step_*' data=local ...
    python run.py -m mode=loss,harness ckpt='glob:ckpts/step_*'          # cartesian product: 2 x N jobs
    python run.py sweep=scan_loss ckpt='glob:ckpts/step_*'               # a ready sweep (conf/sweep/)

- ``expand``: `ckpt=glob:PATTERN` -> one job per complete checkpoint in step order; skipped matches kept;
- ``callback``: per job (in the job's process, whatever the launcher): `job_status.json`, submitit's ranks;
- ``summary``: the table, `summary.csv` / `summary.png` and the parent run's summary, every match a row.

The sweeper plugin (``hydra_plugins/ckpteval_sweeper``) drives them; ``ckpteval.job.run_scan`` owns the parent
run's life. A scan with failed jobs exits 1 after its summary.
"""

from ckpteval.scan.callback import STATUS_FILE, SweepCallback, freeze_survivors
from ckpteval.scan.expand import (
           Matches,
           Skipped,
           every_nth,
           expand_pattern,
           job_override_lists,
           match_pattern,
           quote_value,
)
from ckpteval.scan.summary import (
           JobRecord,
           RecordStatus,
           best_per_metric,
           key_metrics,
           load_records,
           plot_metrics,
           summarize,
           summary_table,
           write_csv,
)

__all__ = ["STATUS_FILE", "JobRecord", "Matches", "RecordStatus", "Skipped", "SweepCallback", "best_per_metric",
           "every_nth", "expand_pattern", "freeze_survivors", "job_override_lists", "key_metrics", "load_records",
           "match_pattern", "plot_metrics", "quote_value", "summarize", "summary_table", "write_csv"]
