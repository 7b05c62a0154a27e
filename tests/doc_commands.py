"""The `mmggem` commands of the documentation, found and checked (test code: tests/test_documented_commands.py).

Found: every fenced shell block (```bash, sh, shell, console) of a Markdown file is read as a shell
would split it: backslash continuations and quotes that span lines are joined, comments and heredoc
bodies dropped, and each line is split into simple commands at ``&&``, ``||``, ``;``, ``|`` and
``&``. A simple command is mmggem's when it runs ``mmggem`` (any path to it, also behind ``srun``,
``nohup``, ``env`` ...), ``-m mmggem`` or ``-m mmggem.cli`` (python, ``accelerate launch``, torchrun,
srun), or ``launch/slurm.sh`` (sbatch), which runs ``mmggem train "$@" train.resume=latest``.
Synopsis brackets (``[--classnames FILE]``, ``[a|b]``) keep their first alternative.

Checked: ``train`` and ``ablate`` with ``--dry-run``, in this process through :func:`mmggem.cli.main`
with the working directory at the repository root, so the config file, every key and every flag is
checked as a run would check it, and so are the files its launcher reads (accelerate's ``--config_file``,
the SLURM script); the other subcommands have their flags parsed by the real parser
without running (``demo`` also has its overrides read over the demo recipe). A config path that is a
placeholder (``/path/to/...``, ``<...>``, ``$VAR``, ``~/...``, an upper-case word, a file outside the
repository that is not there) skips that command with a note; a config inside the repository must exist.
A dry run that gets as far as listing what a real run would stop on (exit 2) passes: the shards, sets and
weights the documentation names are not on the test machine, and what is checked is the command itself.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterator
from unittest import mock

import mmggem.cli
from mmggem.cli import SUBCOMMANDS, build_parser, main
from mmggem.config.run import load_config

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
CHECKED_BY_DRY_RUN = ("train", "ablate")
SLURM_SCRIPT = "launch/slurm.sh"
SLURM_APPENDS = ("train.resume=latest",)  # launch/slurm.sh: `mmggem.cli train "$@" train.resume=latest`
WRAPPERS = ("srun", "nohup", "env", "exec", "time", "sudo", "timeout")

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_]\w*)\1")
_SYNOPSIS = re.compile(r"(?<!\S)\[([^\]]*)\]")  # outside quotes: an optional part of a synopsis
_QUOTED = re.compile(r"('[^']*'|\"(?:\\.|[^\"\\])*\")")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_REDIRECT = re.compile(r"^\d*(>>?|<)(.*)$")
_PLACEHOLDER = re.compile(r"<[^>]+>|\$\{?\w+\}?|^~|/path/to/|^[A-Z][A-Z0-9_]*(\.ya?ml)?$")
_METAVARS = ("...", "key=value", "KEY=VALUE")
_PROBLEMS_LISTED = re.compile(r"^a real run would stop on \d+ problem\(s\)", re.MULTILINE)  # mmggem.train.dry_run


@dataclass(frozen=True)
class Command:
    """One documented mmggem invocation: where it is, what it says, and the arguments mmggem gets."""

    file: str
    line: int
    text: str
    argv: tuple[str, ...]
    launcher_files: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Check:
    """The outcome of one command: a failure message, a skip note, or neither (it passed)."""

    command: Command
    failure: str | None = None
    skipped: str | None = None


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it, as the reports name files."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def documented_files() -> list[Path]:
    """README.md, CONTRIBUTING.md (when there) and every Markdown page under docs/."""
    tops = [ROOT / name for name in ("README.md", "CONTRIBUTING.md") if (ROOT / name).is_file()]
    return tops + sorted((ROOT / "docs").rglob("*.md"))


def shell_blocks(markdown: str) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """``(language, [(line number, line), ...])`` of every fenced shell block."""
    fence, language, lines = None, "", []
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, language, lines = match.group(1), match.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            if language in SHELL_LANGUAGES:
                yield language, lines
            fence = None
        elif fence is not None:
            lines.append((number, line))


def _scan(text: str) -> tuple[str, str | None]:
    """``text`` without shell comments (``#`` starting a word outside quotes), and the quote it leaves open."""
    kept, quote, index = [], None, 0
    while index < len(text):
        char = text[index]
        if char == "\\" and quote != "'":
            kept.append(text[index:index + 2])
            index += 2
            continue
        if quote is None and char == "#" and (index == 0 or text[index - 1].isspace()):
            end = text.find("\n", index)
            if end < 0:
                break
            index = end
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        kept.append(char)
        index += 1
    return "".join(kept), quote


def logical_lines(language: str, lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """``(first line number, text)`` of each command line, continuations and multi-line quotes joined,
    heredoc bodies skipped; in a console block only ``$ `` lines (and their continuations) are commands."""
    pending, start, heredoc = "", 0, None
    for number, line in lines:
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        stripped = line.strip()
        if not pending:
            if language == "console" and not stripped.startswith("$ "):
                continue
            line, start = stripped[2:] if stripped.startswith("$ ") else line, number
        elif language == "console" and stripped.startswith("> "):
            line = stripped[2:]
        text, quote = _scan(pending + line)
        if quote is not None:
            pending = pending + line + "\n"
        elif text.rstrip().endswith("\\"):
            pending = text.rstrip()[:-1] + " "
        else:
            pending = ""
            heredoc_start = _HEREDOC.search(text)
            heredoc = heredoc_start.group(2) if heredoc_start else None
            yield start, text


def simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command of a line, split at ``&&``, ``||``, ``;``, ``|`` and ``&``."""
    text = "".join(part if part[:1] in "'\"" else _SYNOPSIS.sub(_first_alternative, part)
                   for part in _QUOTED.split(text))
    lexer = shlex.shlex(text, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, ""
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word and not word.strip("|&;"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [_without_redirects(words) for words in commands if words]


def _first_alternative(group: re.Match) -> str:
    """A synopsis group ``[--templates NAME|FILE]`` as ``--templates NAME``."""
    return re.sub(r"(\S+?)\|\S+", r"\1", group.group(1))


def _without_redirects(words: list[str]) -> list[str]:
    """``words`` without shell redirections (``> log``, ``2>&1``, ``<in``); a ``<PLACEHOLDER>`` is kept."""
    kept, index = [], 0
    while index < len(words):
        word = words[index]
        match = None if word.startswith("<") and word.endswith(">") else _REDIRECT.match(word)
        if match:
            index += 1 if match.group(2) else 2
            continue
        kept.append(word)
        index += 1
    return kept


def mmggem_argv(words: list[str]) -> list[str] | None:
    """The arguments mmggem gets from a simple command, or None when it does not run mmggem."""
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    for index, word in enumerate(words[:-1]):
        if word == "-m" and words[index + 1] in ("mmggem", "mmggem.cli"):
            return words[index + 2:]
    program = Path(words[0]).name
    if program in ("sbatch", "bash", "sh"):
        script = next((i for i, word in enumerate(words) if word.endswith(SLURM_SCRIPT)), None)
        return None if script is None else ["train", *words[script + 1:], *SLURM_APPENDS]
    candidates = range(len(words)) if program in WRAPPERS else range(1)
    for index in candidates:
        rest = words[index + 1:]
        if Path(words[index]).name == "mmggem" and (not rest or rest[0] in SUBCOMMANDS or rest[0].startswith("-")):
            return rest
    return None


def launcher_files(words: list[str]) -> tuple[str, ...]:
    """The files the launcher of a command reads: accelerate's ``--config_file`` and the SLURM script."""
    named = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--config_file", "--config-file")]
    named += [word.partition("=")[2] for word in words if word.startswith(("--config_file=", "--config-file="))]
    return tuple(named + [word for word in words if word.endswith(SLURM_SCRIPT)])


def documented_commands(path: Path) -> list[Command]:
    """Every mmggem invocation in the shell blocks of the Markdown file ``path``."""
    found = []
    for language, lines in shell_blocks(path.read_text()):
        for number, text in logical_lines(language, lines):
            for words in simple_commands(text):
                argv = mmggem_argv(words)
                if argv is not None:
                    argv = [word for word in argv if word not in _METAVARS]
                    found.append(Command(display_path(path), number, " ".join(text.split()), tuple(argv),
                                         launcher_files(words)))
    return found


def is_placeholder(config: str) -> bool:
    """A config path a reader substitutes: ``/path/to/...``, ``<...>``, ``$VAR``, ``~/...``, ``CONFIG``,
    or a file outside the repository that is not there; one inside the repository is real."""
    if _PLACEHOLDER.search(config):
        return True
    path = (ROOT / config).resolve()
    return not path.is_relative_to(ROOT) and not path.exists()


def _run_main(argv: list[str]) -> tuple[int, str]:
    """``mmggem ARGV`` in this process at the repository root: its exit code and what it printed."""
    output = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's errors, --help and --version
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, output.getvalue()


def _parsed(args: argparse.Namespace) -> int:
    return 0


def _demo_overrides(args: argparse.Namespace) -> int:
    """`mmggem demo`'s overrides, read over the recipe it trains (a wrong key is a ConfigError)."""
    load_config(Path(str(files("mmggem") / "recipes" / "demo.yaml")), args.overrides)
    return 0


def _parse_only_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The real parser, every command's work replaced by a check that its arguments parsed."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(func=_demo_overrides if sub.prog == "mmggem demo" else _parsed)
                _parse_only_parser(sub)
    return parser


def _config_of(argv: list[str]) -> str | None:
    """The CONFIG argument of a train or ablate command, when its arguments parse."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return str(build_parser().parse_known_args(argv)[0].config)
        except SystemExit:
            return None


def check_command(command: Command) -> Check:
    """Run one documented command's check; see the module docstring for what is checked."""
    missing = [name for name in command.launcher_files if not is_placeholder(name) and not (ROOT / name).exists()]
    if missing:
        return _failure(command, f"the launcher's {missing[0]} does not exist")
    argv = list(command.argv)
    subcommand = next((word for word in argv if not word.startswith("-")), None)
    if subcommand in CHECKED_BY_DRY_RUN:
        config = _config_of(argv)
        if config is not None and is_placeholder(config):
            return Check(command, skipped=f"config {config} is a placeholder")
        code, output = _run_main([*argv, "--dry-run"] if "--dry-run" not in argv else argv)
        if code == 2 and _PROBLEMS_LISTED.search(output):
            return Check(command)
    else:
        with mock.patch.object(mmggem.cli, "build_parser", _parse_only_parser):
            code, output = _run_main(argv)
    if code == 0:
        return Check(command)
    errors = [line for line in output.splitlines() if "error" in line.lower()] or output.splitlines()[-3:]
    return _failure(command, f"exit {code}: " + "\n    ".join(errors))


def _failure(command: Command, detail: str) -> Check:
    """A failed check, reported as ``FILE:LINE: COMMAND`` and the indented ``detail``."""
    return Check(command, failure=f"{command.where}: {command.text}\n    {detail}")


def check_file(path: Path) -> list[Check]:
    """The checks of every documented command of ``path``."""
    return [check_command(command) for command in documented_commands(path)]
