"""Config errors Hydra finds while composing (a misspelt key, a wrong type, a choice outside its Enum) as the
same one `error: ...` line and exit code 2 as every other bad input (`ckpteval.job.exit_with`), instead of
Hydra's four-line report and exit 1. `HYDRA_FULL_ERROR=1` still gives Hydra's full traceback.

Hydra has no hook for this: `run.py` swaps the reporter Hydra's entry point calls (`hydra._internal.utils.
run_and_report`, stable across hydra-core 1.3.x, which pyproject pins) for one that handles composition errors
and hands everything else to the original.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def one_line(ex: BaseException) -> str | None:
    """The error line for a composition error, None for anything else."""
    from hydra.errors import CompactHydraException, ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(ex, (ConfigCompositionException, MissingConfigException, CompactHydraException)):
        return None
    text = " ".join(line.strip() for line in str(ex).splitlines() if line.strip())
    text = text.split(" Config search path:")[0]  # Hydra's search path says nothing the user can act on
    cause = ex.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
        text += f": {str(cause).strip().splitlines()[0]}"
    return f"{text} (python run.py --cfg job ... shows the composed config; --help lists the groups)"


def install() -> None:
    import hydra._internal.utils as hydra_utils

    original: Callable[[Callable[[], Any]], Any] = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as ex:  # noqa: BLE001 - anything not ours goes to Hydra's own reporter below
            caught = ex
            line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else one_line(caught)
            if line is None:
                def reraise() -> Any:
                    raise caught

                return original(reraise)
            from ckpteval.errors import CkptEvalError
            from ckpteval.job import exit_with

            exit_with(CkptEvalError(line))

    hydra_utils.run_and_report = run_and_report
