"""The site's own ClientApp runner: a site runs only the app bundle it approved.

Flower's stock runner (`flwr-clientapp`) unpacks whatever bundle (FAB) a run names and imports
it with the bundle first on `sys.path`, as the site user, with the site's keys and data in
reach. Here the SuperNode runs with `--isolation process`, and this long-lived process claims
each task from the SuperNode's local Runtime API (the claim is HMAC-authenticated with a secret
only the site holds), hashes the FAB bytes it is sent, and refuses a bundle whose sha256 the
site's policy does not list, before any of it is unpacked or imported. For an approved bundle
it checks the run's plan against the site's policy, then runs fedrad's *installed* ClientApp,
chosen from a fixed allow-list by the run's `secagg` setting; the bundle itself is never used.
Torch and the model stay loaded between tasks, so a deployed round costs what a simulated one does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedrad.client.site.config import SiteConfig, SiteConfigError, load_site_config
from fedrad.common.protocol.release_app import clientapp_for, fab_sha256

logger = logging.getLogger("fedrad.client.site.app_runner")  # also when run as __main__

POLL_S: Final[float] = 0.5  # between claims while the SuperNode has no task
ACQUIRE_METHOD: Final[str] = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class Verdict:
    """What the runner decided about one task, before anything of the bundle is used."""

    app: str | None  # the installed ClientApp to run; None: refused
    reason: str = ""  # one line, safe to send to the coordinator and to log
    bundle_refused: bool = False  # the FAB itself is not approved here


def judge_task(
    config: SiteConfig, fab_bytes: bytes, run_config: dict[str, Any]
) -> tuple[Verdict, str]:
    """(verdict, the FAB's sha256): approved bundle, plan within the site's policy, app
    from the allow-list; pure, so every refusal is tested without Flower."""
    from fedrad.client.site.policy import check_run_plan

    digest = fab_sha256(fab_bytes)
    if digest not in config.policy.approved_apps:
        return (
            Verdict(
                None,
                f"this site has not approved app bundle sha256 {digest[:16]}... "
                "(fedrad-site approve)",
                bundle_refused=True,
            ),
            digest,
        )
    reason = check_run_plan(config.policy, run_config)
    if reason is not None:
        return Verdict(None, reason), digest
    try:
        return Verdict(clientapp_for(run_config)), digest
    except ValueError as exc:
        return Verdict(None, str(exc)), digest


def _load_app(name: str) -> Any:
    """An installed ClientApp object by its `module:attribute` name (allow-listed names only)."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Runner:
    """Claims the SuperNode's tasks one at a time and answers each."""

    def __init__(self, config_path: Path, runtime_address: str, secret: bytes) -> None:
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.config_path = Path(config_path)
        self.runtime_address = runtime_address
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,  # the SuperNode's local API, on 127.0.0.1 only
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})
                ),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        self.stopping = threading.Event()
        self.tasks = 0

    def serve(self) -> None:
        """Until stopped: claim a task, answer it, repeat."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while not self.stopping.is_set():
            try:
                reply = self.client.AcquireTask(request)
            except Exception as exc:  # the SuperNode restarting: try again shortly
                logger.debug("no task claimed (%s)", exc)
                self.stopping.wait(POLL_S * 4)
                continue
            if reply.HasField("task") and reply.token:
                self.run_task(reply.token)
            else:
                self.stopping.wait(POLL_S)

    def run_task(self, token: str) -> None:
        """One task: pull it, judge it, answer it; the reply always goes back."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        message = None
        reply = None
        status, details = SubStatus.FAILED, "the site's runner failed"
        try:
            message, context, run, fab = pull_task_input(client)
            self.tasks += 1
            try:
                config = load_site_config(self.config_path)  # re-read: policy edits apply now
            except SiteConfigError as exc:
                # the detail (paths) stays here; the coordinator learns only that it is refused
                logger.error("run %s: refused: the site's config is unusable: %s", run.run_id, exc)
                details = "the site's configuration is unusable (see the site's log)"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"refused: {details}"),
                    reply_to=message,
                )
                return
            verdict, digest = judge_task(config, fab.content, dict(context.run_config))
            if verdict.app is None:
                logger.warning("run %s: refused: %s", run.run_id, verdict.reason)
                _record_refusal(config, str(run.run_id), message, verdict.reason)
                code = (
                    ErrorCode.INVALID_FAB
                    if verdict.bundle_refused
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                )
                error = Error(code=code, reason=f"refused: {verdict.reason}")
                reply = Message(error, reply_to=message)
                details = verdict.reason
                return
            logger.info(
                "run %s: %s task with approved bundle %s...: %s",
                run.run_id,
                message.metadata.message_type,
                digest[:16],
                verdict.app,
            )
            reply = _load_app(verdict.app)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception:  # one task's failure must not end the site's runner
            logger.exception("task failed")
            if message is not None:
                reply = Message(
                    Error(
                        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                        reason="site agent error (details in the site log)",
                    ),
                    reply_to=message,
                )
        finally:
            heartbeat.stop()
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception:  # the SuperNode gone: its own timeout speaks for us
                    logger.exception("could not send the reply")
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()


def _record_refusal(config: SiteConfig, run_id: str, message: Any, reason: str) -> None:
    """A refused run is on the site's ledger too (it spends nothing)."""
    from fedrad.client.site.policy import record_refusal

    round_no, named = _round_of(message)
    try:
        record_refusal(config, named or run_id, round_no, reason)
    except Exception:  # the refusal stands even if it cannot be recorded
        logger.exception("could not record the refusal in the ledger")


def _round_of(message: Any) -> tuple[int, str | None]:
    """(round, the plan's run id) as the message's round config names them, if it does: the
    ledger files a refusal under the run id its training entries would carry."""
    round_no, run_id = 0, None
    try:
        for record in message.content.config_records.values():
            value = record.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                round_no = value
            named = record.get("run-id")
            if isinstance(named, str) and named:
                run_id = named
    except Exception:  # a message we cannot read still gets its refusal
        return 0, None
    return round_no, run_id


def read_secret(path: Path) -> bytes:
    secret = Path(path).read_bytes()
    if len(secret) < 16:
        raise SiteConfigError(f"{path} holds no usable runner secret")
    return secret


def log_to_stderr() -> None:
    """fedrad's own lines (refusals, which bundle ran) on stderr, whatever the libraries
    imported here did to the root logger; once per process."""
    fedrad_logger = logging.getLogger("fedrad")
    if any(getattr(h, "_fedrad_runner", False) for h in fedrad_logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._fedrad_runner = True  # type: ignore[attr-defined]
    fedrad_logger.addHandler(handler)
    fedrad_logger.setLevel(logging.INFO)
    fedrad_logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedrad's ClientApp runner (fedrad-site start)")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--secret-file", required=True, type=Path)
    args = parser.parse_args(argv)
    log_to_stderr()
    try:
        load_site_config(args.config)
        secret = read_secret(args.secret_file)
    except (SiteConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    runner = Runner(args.config, args.runtime_api_address, secret)

    def stop(signum: int, frame: object) -> None:
        runner.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _preload()
    logger.info("fedrad runner ready")
    runner.serve()


def _preload() -> None:
    """Import the installed ClientApps once, so the first task does not pay for torch."""
    for name in ("fedrad.client.federation.app", "fedrad.client.federation.secure_aggregation"):
        importlib.import_module(name)


if __name__ == "__main__":
    main()
