"""Reading report CSVs with bounded cost: a site's `reports.csv`, or any export handed to
`fedrad-site label`.

An export can be broken or crafted like any file: one line of gigabytes, a quoted field that
never closes, text that is not UTF-8. Lines are read at most `MAX_LINE_CHARS` at a time and a
field may hold at most `MAX_FIELD_CHARS`, so memory stays bounded whatever the file holds; a
report longer than `MAX_REPORT_CHARS` is skipped with a reason rather than labelled. The site
export is streamed: only the rows that join a decoded study are kept.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, TextIO

from fedrad.client.ingest.site_files import RefusedFileError

REPORTS_FILE: Final[str] = "reports.csv"
REPORT_ID_COLUMN: Final[str] = "accession_number"
REPORT_TEXT_COLUMN: Final[str] = "report"

MAX_LINE_CHARS: Final[int] = 1 << 20
"""One physical line of an export; a report is kilobytes, a line of a megabyte is not one."""
MAX_FIELD_CHARS: Final[int] = 1 << 20
"""One field, across the lines a quoted field spans."""
MAX_REPORT_CHARS: Final[int] = 64 * 1024
"""The longest report labelled: radiology reports run to a few thousand characters."""
MAX_ACCESSION_CHARS: Final[int] = 64
"""DICOM's AccessionNumber is at most 16 characters; 64 leaves room for a site's prefixes."""


class ExportError(Exception):
    """The export cannot be read; the message says why in one line."""


@dataclass(frozen=True)
class ReportRow:
    accession: str
    report: str
    indication: str
    line: int


@contextmanager
def text_read_errors(path: Path, error: type[Exception]) -> Iterator[None]:
    """What reading a text file or CSV can raise, as `error` with a one-line reason."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise error(f"{path}: malformed CSV ({exc})") from exc
    except (ExportError, RefusedFileError) as exc:
        raise error(f"{path}: {exc}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from exc


def bounded_lines(handle: TextIO, limit: int = MAX_LINE_CHARS) -> Iterator[str]:
    """The handle's lines, refusing one longer than `limit` before it is held whole."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(("\n", "\r")):
            raise ExportError(f"line {number} is longer than {limit} characters")
        yield line


@contextmanager
def field_limit(limit: int = MAX_FIELD_CHARS) -> Iterator[None]:
    """The csv module's field limit (process-wide) set for one read, then restored."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


@contextmanager
def csv_rows(binary: BinaryIO) -> Iterator[csv.DictReader[str]]:
    """A DictReader over an open binary file (UTF-8, a BOM allowed), lines and fields bounded."""
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
    try:
        with field_limit():
            yield csv.DictReader(bounded_lines(text))
    finally:
        text.detach()  # the caller closes the file it opened


def site_report_rows(binary: BinaryIO, path: Path, error: type[Exception]) -> Iterator[ReportRow]:
    """The rows of a site's report export, in file order; `error` (one line) when the file
    cannot be read as the contract requires: accession_number and report columns."""
    with text_read_errors(path, error), csv_rows(binary) as reader:
        columns = {c.strip().lower() for c in (reader.fieldnames or [])}
        missing = {REPORT_ID_COLUMN, REPORT_TEXT_COLUMN} - columns
        if missing:
            raise error(
                f"{path}: missing column(s) {', '.join(sorted(missing))} "
                f"(needs {REPORT_ID_COLUMN}, {REPORT_TEXT_COLUMN})"
            )
        ended = reader.line_num  # a quoted report spans lines: a row is named by its first
        for row in reader:
            norm = {(k or "").strip().lower(): (v or "") for k, v in row.items() if k}
            yield ReportRow(
                accession=norm.get(REPORT_ID_COLUMN, "").strip(),
                report=norm.get(REPORT_TEXT_COLUMN, ""),
                indication=norm.get("indication", "").strip(),
                line=ended + 1,
            )
            ended = reader.line_num


def row_problem(row: ReportRow) -> str | None:
    """Why a report row cannot be used, or None."""
    if not row.accession:
        return "report row without accession_number"
    if len(row.accession) > MAX_ACCESSION_CHARS:
        return f"accession_number longer than {MAX_ACCESSION_CHARS} characters"
    if not row.report.strip():
        return "empty report text"
    if len(row.report) > MAX_REPORT_CHARS or len(row.indication) > MAX_REPORT_CHARS:
        return f"report text longer than {MAX_REPORT_CHARS} characters"
    return None
