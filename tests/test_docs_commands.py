"""Every `fedrad-*` command the README and docs/ show names a real subcommand and real options.

A page that tells a hospital to type a flag the CLI no longer has fails here, not at the site.
Commands are read from fenced code blocks and from inline code that starts with a command name.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from fedrad.client.cli import app as site_app
from fedrad.server.cli import app as coordinator_app
from fedrad.simulations.audit_cli import empirical_app, ledger_app
from fedrad.simulations.cli import app as sim_app
from tests.test_docs import FENCE, ROOT, pages

CODE_SPAN = re.compile(r"`(fedrad-[^`\n]+)`")
PROGRAM = re.compile(r"(?:^|[\s/])(fedrad-(?:site|coordinator|sim|audit))(?=\s|$)")
STOP = {"|", "||", "&&", ";", ">", ">>", "2>", "&", "2>&1"}
PLACEHOLDER = re.compile(r"[<>\[\]{}|]|\.\.\.")


def command_lines(text: str) -> list[str]:
    """Shell lines (continuations joined, comments dropped) that run a fedrad command."""
    lines: list[str] = []
    for block in FENCE.finditer(text):
        joined = re.sub(r"\\\n\s*", " ", block.group(0))
        for line in joined.splitlines()[1:-1]:
            line = re.sub(r"(^|\s)#.*$", "", line)
            if PROGRAM.search(line):
                lines.append(line.strip())
    prose = FENCE.sub("", text)
    lines.extend(m.group(1) for m in CODE_SPAN.finditer(prose))
    return lines


def resolve(program: str, args: list[str]) -> tuple[click.Command, list[str], str]:
    """The click command a line reaches, the words after it, and the name it was reached by."""
    name = program
    if program == "fedrad-audit":
        app = empirical_app if args[:1] == ["empirical"] else ledger_app
        if args[:1] == ["empirical"]:
            args, name = args[1:], "fedrad-audit empirical"
    else:
        app = {"fedrad-site": site_app, "fedrad-coordinator": coordinator_app}.get(program, sim_app)
    command = typer.main.get_command(app)
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        if PLACEHOLDER.search(args[0]):
            break  # `bench labeler|model`: a summary, not a command line
        if args[0] not in command.commands:
            raise LookupError(f"{name} has no command {args[0]!r}")
        name = f"{name} {args[0]}"
        command = command.commands[args.pop(0)]
    return command, args, name


def problems(line: str) -> list[str]:
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    found = []
    while words:
        at = next((i for i, w in enumerate(words) if PROGRAM.search(f" {w}")), None)
        if at is None:
            break
        program = PROGRAM.search(f" {words[at]}").group(1)
        rest = words[at + 1 :]
        end = next((i for i, w in enumerate(rest) if w in STOP), len(rest))
        args, words = rest[:end], rest[end:]
        if any(PLACEHOLDER.search(w) for w in args[:1]):
            continue  # `fedrad-site <command>`: not a command line
        try:
            command, args, name = resolve(program, args)
        except LookupError as exc:
            found.append(f"{line}: {exc}")
            continue
        if isinstance(command, click.Group):
            continue  # a group named alone: its help
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in args:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and not PLACEHOLDER.search(flag) and flag not in known:
                found.append(f"{line}: {name} has no option {flag}")
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert [p for line in command_lines(text) for p in problems(line)] == []


def test_the_check_can_fail() -> None:
    text = (
        "```sh\nfedrad-site init DIR --site-id a \\\n    --no-such-flag 1  # comment\n"
        "fedrad-coordinator launch --dir x\n"
        "fedrad-sim bench utility --rounds 2 | tee out\n```\n"
        "Run `fedrad-audit empirical --bogus` to see.\n"
    )
    found = [p for line in command_lines(text) for p in problems(line)]
    assert len(found) == 3
    assert "fedrad-site init has no option --no-such-flag" in found[0]
    assert "fedrad-coordinator has no command 'launch'" in found[1]
    assert "fedrad-audit empirical has no option --bogus" in found[2]
