"""The project's own offline lm-eval tasks, shipped in the wheel (package data): a multiple-choice task, a
loglikelihood_rolling (perplexity) task, a few-shot and a generation task, with their data beside their YAMLs.

    python run.py mode=harness ckpt=PATH harness=offline     # conf/harness/offline.yaml: include_path is this dir

`conf/harness/offline.yaml` reaches this dir through the `${ckpteval_tasks:}` resolver (config.register_configs),
so the config works from any working dir and in an installed wheel.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
