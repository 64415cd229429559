"""`fedrad-site`: the hospital site agent's command line."""

from __future__ import annotations

import csv
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedrad.client.ingest.dicom_io import RADIOGRAPH_MODALITIES
from fedrad.client.ingest.site_data import (
    SiteDataError,
    cache_write_problem,
    prepare_site,
    scan_site,
    site_cache_dir,
)
from fedrad.client.site.config import (
    CONFIG_NAME,
    SiteConfigError,
    init_site,
    load_site_config,
    shareable_files,
    site_budget,
)
from fedrad.client.site.policy import policy_to_table
from fedrad.client.site.supernode import (
    CONNECTED_MARK,
    DEFAULT_RUNTIME_PORT,
    SupernodeError,
    new_runner_secret,
    refusal_reason,
    runner_command,
    site_preflight,
    supernode_command,
    supernode_environment,
)
from fedrad.common.cli_support import (
    EXIT_FINDINGS,
    JsonOpt,
    VerboseOpt,
    emit_json,
    fail,
    progress_bar,
    setup_logging,
)
from fedrad.common.findings import FINDINGS
from fedrad.common.flower_process import FlowerProcessError, flower_executable
from fedrad.common.grounding import CANDIDATES
from fedrad.common.labeling.labeler import label_report
from fedrad.common.modality import VOLUME_MODALITIES
from fedrad.common.model.preprocess import PreprocessConfig
from fedrad.common.privacy.defaults import DEFAULT_DELTA, DEFAULT_EPSILON
from fedrad.common.privacy.ledger import LedgerError
from fedrad.common.tasks import POSSIBLE_THRESHOLD, SUGGEST_THRESHOLD

if TYPE_CHECKING:
    from fedrad.client.reading.comparison import Comparison, Scan
    from fedrad.client.reading.inference import ScanAnswer
    from fedrad.common.model.radiology_model import RadiologyModel
    from fedrad.common.tasks import Thresholds

app = typer.Typer(
    name="fedrad-site",
    help="Hospital site agent: check and prepare local data, label reports, join a federation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ledger_app = typer.Typer(
    help="The site's privacy ledger: recover it, on record, after it was lost or cut short.",
    no_args_is_help=True,
)
app.add_typer(ledger_app, name="ledger")

WorkersOpt = Annotated[int, typer.Option(help="Decoding processes (0 = one per core).", min=0)]


def _modalities(value: str) -> frozenset[str]:
    mods = frozenset(m.strip().upper() for m in value.split(",") if m.strip())
    if not mods:
        fail("--modalities needs at least one modality, e.g. CR,DX")
    return mods


DEFAULT_MODALITIES = ",".join(sorted(RADIOGRAPH_MODALITIES | VOLUME_MODALITIES))
ModalitiesOpt = Annotated[
    str,
    typer.Option(help="Accepted DICOM modalities, comma-separated."),
]


@app.command()
def check(
    data_dir: Annotated[Path, typer.Argument(help="The site's data directory.")],
    json_out: JsonOpt = False,
    modalities: ModalitiesOpt = DEFAULT_MODALITIES,
    workers: WorkersOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Report what would be used for training and what is skipped, and why. Writes nothing.

    Exit 0 when at least one study is usable, 1 when none is, 2 on a fatal problem.
    """
    setup_logging(verbose)
    try:
        with progress_bar("reading DICOM") as bar:
            scan, _ = scan_site(
                data_dir,
                modalities=_modalities(modalities),
                workers=workers,
                progress=bar.update,
                on_total=lambda n: setattr(bar, "total", n),
            )
    except SiteDataError as exc:
        fail(str(exc))
    summary = scan.summary()
    if json_out:
        emit_json(summary)
    else:
        _print_check(summary)
    if not scan.studies:
        typer.echo("error: no usable study (image + report) in this directory", err=True)
        raise typer.Exit(EXIT_FINDINGS)


def _print_check(summary: dict) -> None:
    typer.echo(f"files seen:      {summary['files_seen']}")
    typer.echo(f"images decoded:  {summary['images_decoded']}")
    typer.echo(f"report rows:     {summary['reports']}")
    series = summary["series"]
    typer.echo(f"series (CT/MR):  {series['seen']} seen, {series['usable']} usable")
    typer.echo(f"usable studies:  {summary['usable']}")
    by_kind = ", ".join(f"{k} {v}" for k, v in summary["usable_by_modality"].items())
    if by_kind:
        typer.echo(f"  by modality:   {by_kind}")
    present = ", ".join(f"{k} {v}" for k, v in summary["labels_present"].items())
    typer.echo(f"labels present:  {present}")
    skipped = summary["skipped"]
    typer.echo(f"skipped:         {len(skipped)}")
    for item in skipped:
        path = item["path"]  # a file name may hold a newline: one skip stays one line
        typer.echo(f"  {path if path.isprintable() else ascii(path)}: {item['reason']}")


@app.command()
def prepare(
    data_dir: Annotated[Path, typer.Argument(help="The site's data directory.")],
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where tensors go (default DATA_DIR/.fedrad-cache).")
    ] = None,
    image_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 128,
    modalities: ModalitiesOpt = DEFAULT_MODALITIES,
    workers: WorkersOpt = 0,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """De-identify, label and preprocess every usable study into the local cache."""
    setup_logging(verbose)
    try:
        config = PreprocessConfig(image_size=image_size)
    except ValueError as exc:
        fail(str(exc))
    cache = site_cache_dir(data_dir, cache_dir)
    try:
        with progress_bar("preparing") as bar:
            scan, manifest = prepare_site(
                data_dir,
                cache,
                config=config,
                modalities=_modalities(modalities),
                workers=workers,
                progress=bar.update,
                on_total=lambda n: setattr(bar, "total", n),
            )
    except SiteDataError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the cache at {cache}: {exc.strerror}")
    summary = scan.summary()
    summary["manifest"] = str(manifest)
    if json_out:
        emit_json(summary)
    else:
        typer.echo(f"{summary['usable']} studies cached; manifest: {manifest}")
    if not scan.studies:
        typer.echo("error: no usable study (image + report) in this directory", err=True)
        raise typer.Exit(EXIT_FINDINGS)


@app.command()
def label(
    reports: Annotated[
        Path | None,
        typer.Argument(
            help="A CSV with a report column (the site's reports.csv, or any export), a text "
            "file holding one report, or a directory of report text files (.txt)."
        ),
    ] = None,
    text: Annotated[
        str | None, typer.Option("--text", help="Label this one report instead of a file.")
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(help="The CSV's report column (default: report, report_text, text, ...)."),
    ] = None,
    id_column: Annotated[
        str | None,
        typer.Option(
            help="The CSV's identifier column (default: accession_number, study_id, "
            "report_id, id; else the line number)."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Label each report: 1 present, 0 absent or negated, -1 uncertain, per finding."""
    from fedrad.client.ingest.report_sources import LabelInput, ReportSourceError, read_label_input

    if (reports is None) == (text is None):
        fail("give a reports file or directory, or --text 'REPORT', not both")
    if text is not None:
        source = LabelInput("text", [("text", text)])
    else:
        try:
            source = read_label_input(reports, column=column, id_column=id_column)  # type: ignore[arg-type]
        except ReportSourceError as exc:
            fail(str(exc))
    out: dict[str, dict[str, int]] = {}
    for ident, report in source.reports:
        if not report.strip():
            typer.echo(f"warning: {ident}: empty report; skipped", err=True)
            continue
        key, n = ident, 1
        while key in out:
            n += 1
            key = f"{ident}#{n}"
        out[key] = label_report(report).labels
    if not out:
        fail("no report to label")
    if json_out:
        emit_json(out)
        return
    writer = csv.writer(typer.get_text_stream("stdout"))
    writer.writerow([source.id_name, *FINDINGS])
    for ident, labels in out.items():
        writer.writerow([ident, *(labels[f] for f in FINDINGS)])


ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="The site's site.toml (made by fedrad-site init)."),
]


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="New directory for the site's config, keys.")],
    site_id: Annotated[str, typer.Option(help="This site's name in the federation.")],
    data_dir: Annotated[Path, typer.Option(help="DICOM files + reports.csv of this site.")],
    epsilon: Annotated[
        float, typer.Option(help="Total privacy budget of this site, over every run.")
    ] = DEFAULT_EPSILON,
    delta: Annotated[float, typer.Option(help="The delta the budget holds at.")] = DEFAULT_DELTA,
    coordinator: Annotated[
        str | None, typer.Option(help="The coordinator's SuperLink address, HOST:PORT.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="The federation CA certificate (from the coordinator).")
    ] = None,
    foundation: Annotated[
        Path | None, typer.Option(help="The federation's starting checkpoint directory.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the de-identified, preprocessed data is kept (default: "
            "DATA_DIR/.fedrad-cache); needed when the data directory is read-only."
        ),
    ] = None,
    max_epsilon_per_run: Annotated[
        float | None,
        typer.Option(help="Site policy: the most epsilon this site spends in one run."),
    ] = None,
    max_epsilon_per_round: Annotated[
        float | None,
        typer.Option(help="Site policy: the most epsilon one round's training may spend."),
    ] = None,
    min_noise: Annotated[
        float | None,
        typer.Option(help="Site policy: the smallest DP-SGD noise multiplier accepted."),
    ] = None,
    require_secagg: Annotated[
        bool, typer.Option("--require-secagg", help="Site policy: only runs under SecAgg+.")
    ] = False,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            help="Site policy: a strategy this site takes part in (fedavg, fedprox, fedadam); "
            "repeat for several. Default: any."
        ),
    ] = None,
    ledger_anchor: Annotated[
        Path | None,
        typer.Option(
            help="Where the ledger's signed anchor is kept (default: beside the ledger key, "
            "keys/ledger_key.anchor.json); best where restoring the ledger does not reach."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the site's config and keys (ledger signing key, SuperNode key); private keys 0600.
    The policy options write a [policy] table: plans outside it are refused, on record."""
    if not data_dir.is_dir():
        fail(f"data directory {data_dir} does not exist")
    problem = cache_write_problem(data_dir, cache_dir, fix="pass --cache-dir")
    if problem is not None:
        fail(problem)
    if ca_file is not None:
        from fedrad.client.site.supernode import is_ca_certificate

        reason = is_ca_certificate(ca_file)
        if reason is not None:
            fail(reason)
    try:
        config = init_site(
            directory,
            site_id=site_id,
            data_dir=data_dir,
            epsilon=epsilon,
            delta=delta,
            coordinator=coordinator,
            ca_file=ca_file,
            foundation_dir=foundation,
            cache_dir=cache_dir,
            max_epsilon_per_run=max_epsilon_per_run,
            max_epsilon_per_round=max_epsilon_per_round,
            min_noise_multiplier=min_noise,
            require_secagg=require_secagg,
            strategies=strategy or None,
            ledger_anchor=ledger_anchor,
        )
    except (SiteConfigError, LedgerError) as exc:
        fail(str(exc))
    public = shareable_files(config)
    policy = policy_to_table(config.policy)
    if as_json:
        emit_json(
            {
                "config": str(directory / CONFIG_NAME),
                "site_id": config.site_id,
                "public_keys": [str(p) for p in public],
                "policy": policy,
                "ledger_anchor": str(config.ledger_anchor_path),
            }
        )
        return
    typer.echo(f"site {config.site_id} initialised in {directory}")
    typer.echo(f"  config: {directory / CONFIG_NAME}")
    typer.echo(f"  ledger anchor: {config.ledger_anchor_path} (keep it; never restore it)")
    typer.echo(f"  budget: epsilon {epsilon:g} at delta {delta:g}, over every run")
    if policy:
        typer.echo("  policy: " + "; ".join(f"{k} = {v}" for k, v in policy.items()))
    typer.echo("  send to the coordinator (public keys only):")
    for path in public:
        typer.echo(f"    {path}")


@app.command()
def start(
    config_path: ConfigOpt = Path(CONFIG_NAME),
    port: Annotated[
        int,
        typer.Option(help="Local port of the SuperNode's own API (one per SuperNode on a host)."),
    ] = DEFAULT_RUNTIME_PORT,
    foundation: Annotated[
        Path | None,
        typer.Option(help="The federation's starting checkpoint (default: foundation_dir)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Join the federation as a Flower SuperNode, in the foreground (Ctrl-C leaves).

    Everything the site trains with comes from its own site.toml. Exit 2 with one line when
    the site cannot join (config, keys, CA, budget, or the coordinator refused it).
    """
    setup_logging(verbose)
    try:
        config = load_site_config(config_path)
        problems = site_preflight(config, foundation=foundation, port=port)
        if problems:
            raise SupernodeError("; ".join(problems))
        chosen = foundation or config.foundation_dir
        assert chosen is not None  # site_preflight refuses a missing foundation
        secret = new_runner_secret(config_path)
        command = supernode_command(
            config,
            config_path=config_path,
            foundation=chosen,
            secret_file=secret,
            port=port,
            executable=flower_executable("flower-supernode"),
        )
    except (SiteConfigError, SupernodeError, FlowerProcessError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the runner secret next to {config_path}: {exc.strerror}")
    env = supernode_environment(config_path)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # same process group: Ctrl-C, or a kill of the group, stops the SuperNode with us
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process, lines), daemon=True).start()
    runner = _start_runner(config_path, secret, port, env)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    before: list[str] = []  # Flower's lines until the coordinator admits the site
    connected = False
    restarts = 0
    try:
        # Until the SuperNode itself exits, then what it wrote last, which names the reason
        # it stopped.
        drain_until: float | None = None
        while drain_until is None or time.monotonic() < drain_until:
            if drain_until is None and process.poll() is not None:
                drain_until = time.monotonic() + 2.0
            if drain_until is None and runner.poll() is not None:
                if restarts >= MAX_RUNNER_RESTARTS:
                    fail(
                        f"the site's ClientApp runner exited {restarts + 1} times (code "
                        f"{runner.returncode}); its last lines are above"
                    )
                restarts += 1
                typer.echo(
                    f"the site's ClientApp runner exited (code {runner.returncode}): restarting",
                    err=True,
                )
                runner = _start_runner(config_path, secret, port, env)
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if connected or verbose:
                typer.echo(line, err=True)
            else:
                before.append(line)
            if not connected and CONNECTED_MARK in line:
                connected = True
                typer.echo(
                    f"site {config.site_id} joined the federation at {config.coordinator}",
                    err=True,
                )
        code = process.wait()
    except KeyboardInterrupt:
        _stop(runner)
        _stop(process)
        typer.echo(f"site {config.site_id} left the federation", err=True)
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(runner)
        if process.poll() is None:
            _stop(process)
        secret.unlink(missing_ok=True)
    if not connected:
        reason = refusal_reason("\n".join(before))
        fail(reason or f"flower-supernode exited with code {code} before connecting")
    fail(f"flower-supernode exited with code {code}")


@app.command()
def approve(
    bundle: Annotated[
        str | None,
        typer.Argument(
            help="The app bundle (.fab file) or its sha256 that this site will run.",
            metavar="FAB|SHA256",
        ),
    ] = None,
    release: Annotated[
        bool,
        typer.Option(
            "--release",
            help="Approve this installed fedrad release's own bundle, computed here.",
        ),
    ] = False,
    config_path: ConfigOpt = Path(CONFIG_NAME),
    as_json: JsonOpt = False,
) -> None:
    """Approve the app bundle this site will run; every other bundle is refused unread.

    The coordinator submits one bundle per fedrad release: `--release` computes its sha256
    from the fedrad installed here, so the site need not take the coordinator's word for it.
    """
    from fedrad.client.site.config import add_approved_app
    from fedrad.client.site.policy import SHA256_HEX
    from fedrad.common.protocol.release_app import fab_sha256, release_fab, release_version

    if release == (bundle is not None):
        fail("give either a bundle (FAB file or sha256) or --release")
    if release:
        digest, what = fab_sha256(release_fab()), f"fedrad {release_version()} release bundle"
    else:
        assert bundle is not None
        path = Path(bundle)
        if SHA256_HEX.fullmatch(bundle.lower()) and not path.exists():
            digest, what = bundle.lower(), "app bundle"
        elif path.is_file():
            try:
                digest, what = fab_sha256(path.read_bytes()), f"app bundle {path.name}"
            except OSError as exc:
                fail(f"cannot read {path}: {exc.strerror}")
        else:
            fail(f"{bundle} is neither a FAB file nor a sha256 (64 hex digits)")
    try:
        added = add_approved_app(config_path, digest)
    except SiteConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot update {config_path}: {exc.strerror}")
    if as_json:
        emit_json({"sha256": digest, "approved": True, "new": added, "what": what})
        return
    state = "approved" if added else "was already approved"
    typer.echo(f"{what} sha256 {digest} {state} in {config_path}")


MAX_RUNNER_RESTARTS = 5  # a runner that keeps dying is a broken install, not bad luck


def _start_runner(
    config_path: Path, secret: Path, port: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """fedrad's ClientApp runner; its log lines go to this terminal (stderr)."""
    return subprocess.Popen(
        runner_command(config_path, secret_file=secret, port=port),
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _read_lines(process: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
    lines.put(None)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (Flower leaves cleanly on it), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@app.command()
def budget(
    config_path: ConfigOpt = Path(CONFIG_NAME),
    as_json: JsonOpt = False,
) -> None:
    """Show the privacy budget spent and left, recomputed from every entry of the site's ledger."""
    try:
        config = load_site_config(config_path)
        status = site_budget(config)
    except (SiteConfigError, LedgerError) as exc:
        fail(str(exc))
    if as_json:
        emit_json(status)
    else:
        spent = status["spent_epsilon"]
        left = status["left_epsilon"]
        typer.echo(
            f"site {status['site_id']}: spent epsilon "
            f"{'unbounded' if spent is None else f'{spent:.3f}'} of {status['budget_epsilon']:g} "
            f"at delta {status['delta']:g} ({status['accountant']}); left "
            f"{0.0 if left is None else left:.3f}; {status['rounds']} rounds in "
            f"{status['runs']} runs; {status['refusals']} refused"
            + (
                f"; {status['recoveries']} ledger recoveries on record (spend before a "
                "recovery is not counted)"
                if status.get("recoveries")
                else ""
            )
        )
    if status["exhausted"]:
        raise typer.Exit(EXIT_FINDINGS)


@ledger_app.command()
def recover(
    reason: Annotated[
        str,
        typer.Option(
            help="Why the loss is accepted, one line (who decided, what happened): signed into "
            "the ledger."
        ),
    ],
    config_path: ConfigOpt = Path(CONFIG_NAME),
    acknowledged: Annotated[
        str | None,
        typer.Option(
            help="The coordinator's acknowledged head LINES:SHA256, as its refusal names it, "
            "when the coordinator's copy is what the ledger lacks.",
            metavar="LINES:SHA256",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Record it without asking.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Record, signed in the ledger itself, that the ledger was found missing, cut short or
    replaced, and continue from what it holds. For the site's privacy officer.

    Shows what was found (the line every start refuses with); on confirmation appends a
    `recovery` event and rewrites the anchor. The spend of lost entries is NOT restored:
    budgets afterwards count only what the ledger holds. Exit 0 when recorded or nothing is
    wrong, 1 when not confirmed, 2 when it cannot be done.
    """
    from fedrad.common.privacy.ledger import reason_problem
    from fedrad.common.privacy.ledger_anchor import inspect_for_recovery, recover_ledger

    problem = reason_problem(reason)
    if problem is not None:
        fail(f"--reason: {problem}")
    try:
        config = load_site_config(config_path)
        found = inspect_for_recovery(
            config.ledger,
            config.ledger_key,
            config.ledger_anchor_path,
            site_id=config.site_id,
            acknowledged=acknowledged,
        )
    except SiteConfigError as exc:
        fail(str(exc))
    except LedgerError as exc:
        fail(
            f"{exc}; a recovery continues a ledger that verifies with the site's key: move this "
            "one aside (keep it for the audit) and run recover again"
        )
    if found.problem is None:
        message = f"nothing to recover: the ledger {config.ledger} and its anchor agree"
        if as_json:
            emit_json({"recovered": False, "found": None, "ledger": str(config.ledger)})
        else:
            typer.echo(message + "; nothing written")
        return
    if not as_json:
        typer.echo(f"ledger:  {config.ledger}")
        typer.echo(f"anchor:  {config.ledger_anchor_path}")
        typer.echo(f"found:   {found.problem}")
        typer.echo(
            "a signed recovery event will be appended and the anchor rewritten; what the lost "
            "entries spent is NOT restored (record it yourself: see the privacy officer's guide)"
        )
    if not yes and not typer.confirm("record this recovery?", default=False, err=True):
        typer.echo("nothing written", err=True)
        raise typer.Exit(EXIT_FINDINGS)
    try:
        done = recover_ledger(
            config.ledger,
            config.ledger_key,
            config.ledger_anchor_path,
            site_id=config.site_id,
            reason=reason,
            acknowledged=acknowledged,
        )
    except LedgerError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the ledger or its anchor: {exc.strerror}")
    if as_json:
        emit_json(
            {
                "recovered": done.entry is not None,
                "found": done.found,
                "previous_head": done.previous_head,
                "ledger_head": done.head,
                "ledger": str(config.ledger),
                "anchor": str(config.ledger_anchor_path),
                "entry": done.entry,
            }
        )
        return
    if done.entry is None:
        typer.echo("nothing to recover any more; nothing written")
        return
    typer.echo(f"recovery recorded: the ledger's head is now {done.head}")


@app.command()
def report(
    scan: Annotated[
        Path,
        typer.Argument(
            help="A DICOM chest radiograph, or a CT/MR series: its directory (or a study's) "
            "or one multi-frame file."
        ),
    ],
    model_dir: Annotated[
        Path,
        typer.Option(
            "--model", help="A checkpoint directory (e.g. runs/<id>/checkpoints/round_005)."
        ),
    ],
    ask: Annotated[str | None, typer.Option(help="A question about the scan.")] = None,
    prior: Annotated[
        Path | None,
        typer.Option(
            help="The same patient's earlier scan of the same kind: the report states the "
            "change since it, and --ask can ask about it. A prior of another patient, a newer "
            "one, another kind of scan or an unreadable one is named and left out."
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            help="Also write one self-contained page (image, a map per suggested finding, "
            "probabilities, report, comparison, answer, notes) that opens with no network."
        ),
    ] = None,
    indication: Annotated[str, typer.Option(help="The clinical question, if any.")] = "",
    beams: Annotated[int, typer.Option(help="Beam width (1 = greedy).", min=1, max=8)] = 1,
    candidates: Annotated[
        int,
        typer.Option(
            help="Report candidates written and re-ranked against the finding head.", min=1, max=8
        ),
    ] = CANDIDATES,
    present_at: Annotated[
        float, typer.Option(help="Head probability at which a finding is decided present.")
    ] = SUGGEST_THRESHOLD,
    possible_at: Annotated[
        float, typer.Option(help="Head probability at which a finding is decided possible.")
    ] = POSSIBLE_THRESHOLD,
    modalities: ModalitiesOpt = DEFAULT_MODALITIES,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write a report, per-finding probabilities and (with --ask) an answer for one scan."""
    from fedrad.client.ingest.dicom_io import UnusableError
    from fedrad.client.reading.comparison import reading_key
    from fedrad.client.reading.inference import answer_scan, read_scan
    from fedrad.common.model.checkpoint import CheckpointError, load_checkpoint
    from fedrad.common.tasks import STATUS_WORDS, Thresholds

    setup_logging(verbose)
    if ask is not None and not ask.strip():
        fail("--ask needs a non-empty question")
    try:
        thresholds = Thresholds(present=present_at, possible=possible_at)
    except ValueError as exc:
        fail(f"--present-at / --possible-at: {exc}")
    if not scan.exists():
        fail(f"no such file: {scan}")
    try:
        model = load_checkpoint(model_dir)
    except CheckpointError as exc:
        fail(str(exc))
    accepted = _modalities(modalities)
    key = reading_key()
    try:
        current = read_scan(scan, model.config, modalities=accepted, key=key)
    except UnusableError as exc:
        fail(f"{scan}: {exc}")
    read_as = current.description
    earlier = None
    if prior is not None:
        try:
            earlier = read_scan(prior, model.config, modalities=accepted, key=key)
        except UnusableError as exc:
            earlier = f"the prior could not be read: {exc}"
        except OSError as exc:
            earlier = f"the prior could not be read: {exc.strerror or exc}"
    result = answer_scan(
        model,
        current.tensor,
        indication=indication,
        question=ask,
        num_beams=beams,
        candidates=candidates,
        thresholds=thresholds,
        current=current,
        prior=earlier,
    )
    if html is not None:
        _write_report_page(html, model, current, earlier, result, ask, thresholds, indication)
    if json_out:
        emit_json(
            {
                "scan": read_as,
                "report": result.report,
                "report_source": result.report_source,
                "findings": result.findings,
                "decisions": {f: STATUS_WORDS[d] for f, d in result.decisions.items()},
                "sides": result.sides,
                "side_probabilities": result.side_probabilities,
                "thresholds": {"present": present_at, "possible": possible_at},
                "answer": result.answer,
                "answer_value": result.answer_value,
                "comparison": _comparison_json(result.comparison),
                "notes": list(result.notes),
                **({"html": str(html)} if html is not None else {}),
            }
        )
        return
    typer.echo(f"(read as: {read_as})")
    typer.echo(result.report)
    typer.echo(f"(report: {result.report_source})")
    typer.echo("")
    for finding, prob in sorted(result.findings.items(), key=lambda kv: -kv[1]):
        side = result.sides.get(finding)
        where = ""
        if side is not None:
            where = f", {side} ({result.side_probabilities[finding][side]:.2f})"
        typer.echo(f"  {finding:<18} {prob:.3f}  {STATUS_WORDS[result.decisions[finding]]}{where}")
    if result.comparison is not None and not result.comparison.compared:
        typer.echo(f"\ncomparison left out: {result.comparison.reason}")
    if result.answer is not None:
        typer.echo(f"\nQ: {ask}\nA: {result.answer}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    if html is not None:
        typer.echo(f"page written: {html}")


def _write_report_page(
    path: Path,
    model: RadiologyModel,
    current: Scan,
    prior: Scan | str | None,
    result: ScanAnswer,
    question: str | None,
    thresholds: Thresholds,
    indication: str,
) -> None:
    """The clinician's page: maps for each suggested finding, then one self-contained file."""
    from fedrad.client.reading.page import write_page
    from fedrad.client.reading.page_content import page_content

    content = page_content(
        model,
        current,
        prior,
        result,
        question=question,
        thresholds=thresholds,
        indication=indication,
    )
    try:
        write_page(content, path)
    except OSError as exc:
        fail(f"--html {path}: {exc.strerror or exc}")


def _comparison_json(comparison: Comparison | None) -> dict[str, object] | None:
    """The comparison as `report --json` prints it (no date: only the interval in days)."""
    if comparison is None:
        return None
    if not comparison.compared:
        return {"compared": False, "reason": comparison.reason}
    return {
        "compared": True,
        "days_before": comparison.days_before,
        "changes": comparison.changes,
        "change_probabilities": comparison.probabilities,
        "rule": comparison.rule,
        "prior_findings": comparison.prior_findings,
        "statement": comparison.statement,
    }


def main() -> None:
    app()
