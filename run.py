"""ckpteval entry point: compose the Hydra config and hand it to the mode it names.

    python run.py                                   # demo: train a tiny Llama, evaluate every eval.interval
    python run.py mode=loss ckpt=PATH data=local data.dataset_path=DIR
    torchrun --nproc_per_node=2 run.py mode=loss parallel=fsdp ckpt=PATH ...
    python run.py -m mode=loss ckpt='glob:outputs/**/step_*' data=local data.dataset_path=DIR
    python run.py sweep=scan_loss ckpt='glob:outputs/**/step_*'     # a ready scan (conf/sweep/), no -m needed

Imports stay light here (no torch, transformers or mlflow): `--help` and `--cfg job` answer in about a second;
the job imports what its mode needs.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from ckpteval.config import register_configs

register_configs()


def _rank_overrides(argv: list[str]) -> list[str]:
    """Under torchrun, rank 0 owns the Hydra run dir (the app hands its path to the other ranks once the process
    group is up); the other ranks log to the console and create no run dir of their own."""
    if int(os.environ.get("RANK", "0")) == 0 or {"-m", "--multirun"} & set(argv):
        return []
    wanted = {"hydra.output_subdir": "null", "hydra/job_logging": "stdout", "hydra.run.dir": "${paths.outputs}"}
    given = {a.lstrip("+").split("=", 1)[0] for a in argv}
    return [f"{key}={value}" for key, value in wanted.items() if key not in given]


def _sweep_group(argv: list[str]) -> list[str]:
    """`+sweep=NAME` (the spelling before `sweep` joined the defaults list as `sweep: null`, where Hydra refuses
    to append it again) selects the group like `sweep=NAME`."""
    return [arg[1:] if arg.startswith("+sweep=") else arg for arg in argv]


def _quote_paths(argv: list[str]) -> list[str]:
    """`ckpt=/x/epoch=0-step=10.ckpt` (Lightning's default name) has an `=` Hydra's override grammar refuses
    unquoted: pass such a path value on as Hydra's quoted form, `ckpt='/x/epoch=0-step=10.ckpt'`."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in ("ckpt", "ckpt_base", "tokenizer") and "=" in value and value[:1] not in "'\"":
            if "," in value:  # a list of paths (a sweep): only the user knows where each one ends
                print(f"hint: Hydra reads '=' in {key}= values as syntax: quote each path, e.g. "
                      f"{key}='\"/x/epoch=0-step=10.ckpt\"'", file=sys.stderr)
            else:
                from ckpteval.scan.expand import quote_value

                arg = f"{key}={quote_value(value)}"
        out.append(arg)
    return out


def _exit_without_teardown() -> None:
    """End a finished process the way Python would, minus tearing down what it imported: a harness job's process
    holds torch, transformers, lm-eval and MLflow, and freeing every one of their objects one by one at exit
    costs ~1 s (2-core CPU) for nothing. Threads are joined and atexit handlers run (logging, temp dirs, library
    cleanups) as in a normal exit; then the streams are flushed and the process ends with status 0. Under a
    profiler or tracer (`python -m cProfile run.py`, coverage) the process exits normally: they report after
    the script returns."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    import atexit
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from ckpteval.app import main as app_main

    return app_main(cfg)


if __name__ == "__main__":
    from ckpteval import cli_errors, startup

    startup.launched_from_cli()  # the first job's time/startup_seconds counts from this process's start
    cli_errors.install()  # composition errors: one `error:` line, exit 2, like every other bad input
    sys.argv[1:] = _quote_paths(_sweep_group(sys.argv[1:]))
    sys.argv += _rank_overrides(sys.argv[1:])
    main()
    _exit_without_teardown()  # errors exit through SystemExit (status 2, 3, ...) as before
