"""Report prose to label, from the shapes it arrives in outside a site's own export: a CSV with a
report column under any usual name, one report per text file, or a folder of text files (as
MIMIC-CXR ships its reports). The site data contract (`reports.csv` with accession_number and
report) is `report_export.site_report_rows`; this reader is only for `fedrad-site label`. Both
read with the bounds of `report_export.py`; links, pipes and devices in a folder are not read."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedrad.client.ingest.report_export import MAX_FIELD_CHARS, csv_rows, text_read_errors
from fedrad.client.ingest.site_files import open_regular_file, walk_site

logger = logging.getLogger(__name__)

REPORT_COLUMNS: Final[tuple[str, ...]] = (
    "report",
    "report_text",
    "text",
    "findings_impression",
    "impression",
    "findings",
)
"""Tried in order (case-insensitive) when --column is not given."""

ID_COLUMNS: Final[tuple[str, ...]] = ("accession_number", "study_id", "report_id", "id")

MAX_LABEL_CSV_BYTES: Final[int] = 1 << 30
"""`label` keeps every report of its input in memory to write its answer: a gigabyte of
reports (several hundred thousand) is its most."""

TEXT_SUFFIXES: Final[frozenset[str]] = frozenset({".txt", ".text", ".rpt"})


class ReportSourceError(Exception):
    """The input cannot be read as reports; the message says why in one line."""


@dataclass(frozen=True)
class LabelInput:
    """Reports in input order, and the name of what identifies them (a column or `file`)."""

    id_name: str
    reports: list[tuple[str, str]]  # (identifier, report text)


def read_label_input(
    path: Path, *, column: str | None = None, id_column: str | None = None
) -> LabelInput:
    """A CSV (by suffix), a text file (one report), or a directory of text files."""
    path = Path(path)
    if not path.exists():
        raise ReportSourceError(f"no such file or directory: {path}")
    if path.is_dir():
        return _read_directory(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, column=column, id_column=id_column)
    return LabelInput("file", [(path.stem, _read_text(path))])


def _read_text(path: Path) -> str:
    with text_read_errors(path, ReportSourceError), open_regular_file(path) as (handle, size):
        if size > MAX_FIELD_CHARS * 4:
            raise ReportSourceError(
                f"{path}: {size} bytes is not one report (at most {MAX_FIELD_CHARS * 4} bytes)"
            )
        return handle.read().decode("utf-8-sig")


def _read_directory(root: Path) -> LabelInput:
    listing = walk_site(root)
    if listing.refused:
        logger.warning(
            "%d entries of the folder were not read (links, pipes, devices)", len(listing.refused)
        )
    files = sorted(e.path for e in listing.files if e.path.suffix.lower() in TEXT_SUFFIXES)
    root = root.resolve()
    if not files:
        raise ReportSourceError(
            f"{root}: no report text files ({', '.join(sorted(TEXT_SUFFIXES))}) in this directory"
        )
    return LabelInput(
        "file", [(str(p.relative_to(root).with_suffix("")), _read_text(p)) for p in files]
    )


def column_key(header: str) -> str:
    """How headers compare: `Report Text`, `report-text` and `report_text` are one column."""
    return header.strip().lower().replace(" ", "_").replace("-", "_")


def header_keys(fieldnames: list[str] | None) -> dict[str, str]:
    """column_key -> the header as the file spells it."""
    return {column_key(c): c for c in (fieldnames or []) if c}


def pick_column(
    columns: dict[str, str], asked: str | None, candidates: tuple[str, ...]
) -> str | None:
    """The actual header for a column asked by name, or the first usual name present."""
    if asked is not None:
        return columns.get(column_key(asked))
    return next((columns[c] for c in candidates if c in columns), None)


@contextmanager
def report_csv(
    path: Path, *, column: str | None, error: type[Exception]
) -> Iterator[tuple[csv.DictReader[str], dict[str, str], str]]:
    """An open CSV of reports: its reader, its headers by `column_key`, and the report column
    (`column`, or the first usual name); `error` with a one-line reason when it has none."""
    with (
        text_read_errors(path, error),
        open_regular_file(path) as (binary, size),
        csv_rows(binary) as reader,
    ):
        if size > MAX_LABEL_CSV_BYTES:
            raise error(
                f"{path}: {size / 2**30:.1f} GiB is more than `label` holds at once "
                f"({MAX_LABEL_CSV_BYTES // 2**30} GiB); split the export"
            )
        columns = header_keys(reader.fieldnames)
        text_col = pick_column(columns, column, REPORT_COLUMNS)
        if text_col is None:
            wanted = repr(column) if column else f"one of {', '.join(REPORT_COLUMNS)}"
            found = ", ".join(columns.values()) or "none"
            raise error(
                f"{path}: no report column {wanted} (columns: {found}); name it with --column"
            )
        yield reader, columns, text_col


def _read_csv(path: Path, *, column: str | None, id_column: str | None) -> LabelInput:
    with report_csv(path, column=column, error=ReportSourceError) as (reader, columns, text_col):
        id_col = pick_column(columns, id_column, ID_COLUMNS)
        if id_column is not None and id_col is None:
            raise ReportSourceError(f"{path}: no column {id_column!r}")
        reports = []
        for line_no, row in enumerate(reader, start=2):
            ident = (row.get(id_col) or "").strip() if id_col else ""
            reports.append((ident or f"line {line_no}", row.get(text_col) or ""))
    return LabelInput(column_key(id_col) if id_col else "line", reports)
