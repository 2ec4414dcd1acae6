"""Console-script entry point of ``mergekit-sdxl``.

Start-up imports torch, transformers and mergekit (seconds). An interrupt that lands inside
one of those imports can leave a module half-imported and surface as an unrelated import
error, so SIGINT and SIGTERM are held until the imports are done and then honoured: exit
130 (143) with one line, as at any other moment (see :mod:`mergekit_sdxl.cli.exit_codes`).
"""

from __future__ import annotations

import gc
import signal
import sys
from types import FrameType
from typing import List, NoReturn, Optional

from mergekit_sdxl.cli.exit_codes import Terminated, raise_terminated, report


def main() -> NoReturn:
    """Run the CLI and exit with its code."""
    pending: List[int] = []

    def hold(signum: int, frame: Optional[FrameType]) -> None:
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    signal.signal(signal.SIGTERM, hold)
    try:
        from mergekit_sdxl.cli.main import prepare, run

        prepare()
    except BaseException as error:  # noqa: BLE001 - every ending gets its exit code
        _restore_handlers()
        sys.exit(report(error))
    _restore_handlers()
    # The imports leave ~10^6 long-lived objects (torch, transformers, mergekit) that every full
    # collection would walk again: planning a merge of many models triggers hundreds of them.
    gc.freeze()
    if pending:
        sys.exit(report(Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()))
    try:
        code = run()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every ending gets its exit code
        code = report(error)
    # What is left is torn down at exit; frozen, the collector does not walk it again (~2 s of
    # interpreter shutdown after torch, transformers and numba).
    gc.freeze()
    sys.exit(code)


def _restore_handlers() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)
