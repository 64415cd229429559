"""What every fedrad CLI shares: logging set-up, one-line fatal errors, JSON output, progress."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from tqdm import tqdm

from fedrad.common.protocol.run_config import run_option

EXIT_OK = 0
EXIT_FINDINGS = 1  # ran, but the answer is "no" (nothing usable, audit failed, ...)
EXIT_USAGE = 2  # bad input: the command could not do its job

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]

# SecAgg+ options: the same for a simulation and a deployment (fedrad-sim, fedrad-coordinator
# run), with their run settings' declared help
SecAggFlag = Annotated[bool, run_option("secagg", "--secagg")]
SecAggShares = Annotated[int | None, run_option("secagg-shares", metavar="N")]
SecAggThreshold = Annotated[int | None, run_option("secagg-threshold", metavar="T")]


def setup_logging(verbose: bool) -> None:
    """Logs go to stderr so that stdout stays clean for --json."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if not verbose:
        quiet_third_party()


def quiet_third_party() -> None:
    """Known, understood notices from dependencies, filtered by exact category and origin
    (never a blanket ignore): they would bury a CLI's one-line answer."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars
    if "transformers" in sys.modules:  # already imported: the variable was read at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    # The same filters for worker processes (Ray actors inherit the environment).
    os.environ.setdefault(
        "PYTHONWARNINGS",
        ",".join(
            [
                "ignore::FutureWarning:transformers.modeling_utils",
                "ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`:UserWarning",
                "ignore:Full backward hook is firing:UserWarning",
                "ignore:Secure RNG turned off:UserWarning",
            ]
        ),
    )
    logging.getLogger("flwr").setLevel(logging.ERROR)  # deprecation notes: not for users
    # dp_accounting notes each fractional RDP order it drops for not converging; dropping
    # an order only loosens (never understates) the bound, so the notice is not news.
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings(
        "ignore",
        message=r"Passing `no_repeat_ngram_size` with `inputs_embeds`",
        category=UserWarning,
    )
    warnings.filterwarnings("ignore", message=r"Full backward hook is firing", category=UserWarning)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr and a meaningful exit code; never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def emit_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=False))


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar on stderr, shown only when stderr is a terminal (tqdm decides)."""
    bar = tqdm(
        desc=description,
        unit="file",
        disable=None if enabled else True,
        file=sys.stderr,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def stage_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A `(stage, done, total)` callback drawing one bar per stage on stderr; without a
    terminal (tqdm's choice) each stage is announced by one line instead, so a log still
    says why nothing happens for minutes."""
    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(
                desc=stage, total=total, file=sys.stderr, leave=False, disable=None
            )
            if bar.disable:
                typer.echo(f"{stage}: {total} steps ...", err=True)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()
