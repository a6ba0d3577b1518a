"""Every ``minicloud …`` command line in README.md and docs/*.md parses with the real CLI parser (nothing runs).

What counts as a command line:
- in a shell code block (```` ``` ````, ```` ```sh ````, ```` ```bash ````, ```` ```console ````), every line that starts
  with ``minicloud `` (after an optional ``$ `` prompt, ``sudo`` or ``VAR=value`` prefixes), joined across ``\\``
  continuations, and every ``$(minicloud …)`` inside any line of such a block;
- in prose, every inline code span that starts with ``minicloud ``.

How a line becomes arguments: a trailing ``# comment`` goes, the line ends at a shell operator (``|``, ``>``, ``&&``,
``;``), ``$(…)`` and ``<placeholder>`` become one token, a lone ``…`` is one token. Synopsis notation is checked in
each of its forms: ``[optional]`` parts both left out and put in, and every alternative of ``a|b`` in turn.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from minicloud.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
TOKEN = "X"  # what a placeholder becomes: a plain word, valid wherever the CLI takes a free-form value

SHELL_OPERATORS = ("|", ">", "<", "&", ";", "2>")  # a word starting with one ends the command (`a|b` is notation)
METAVAR = re.compile(r"[A-Z][A-Z0-9_]*")  # NAME, N, MIB: a value the reader fills in


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/compute.md:62"
    text: str  # the command as written (after `minicloud `)


def _strip_prefixes(line: str) -> str | None:
    """The command after prompts, ``sudo`` and ``VAR=value``; None when the line is not a minicloud command."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:].lstrip()
    while True:
        m = re.match(r"(sudo(\s+-E)?|[A-Z_][A-Z0-9_]*=\S*)\s+", line)
        if not m:
            break
        line = line[m.end() :]
    return line if line.startswith("minicloud ") else None


def _substitutions(line: str) -> tuple[str, list[str]]:
    """``line`` with each ``$(…)`` replaced by a token, and the ``minicloud …`` commands found inside them."""
    inner: list[str] = []
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            body = line[i + 2 : j - 1]
            if body.lstrip().startswith("minicloud "):
                inner.append(body.strip())
            out.append(TOKEN)
            i = j
        else:
            out.append(line[i])
            i += 1
    return "".join(out), inner


def extract(path: Path, root: Path = ROOT) -> list[DocCommand]:
    rel = path.relative_to(root).as_posix()
    found: list[DocCommand] = []
    fence: str | None = None  # the open block's language, or None outside blocks
    pending: tuple[int, str] | None = None  # a command continued with a trailing backslash
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        if fence is not None:
            if fence not in SHELL_BLOCKS:
                continue
            if pending is not None:
                start, text = pending
                line = text + " " + stripped
                number = start
            else:
                line = stripped
            if line.endswith("\\"):
                pending = (number, line[:-1].rstrip())
                continue
            pending = None
            line, inner = _substitutions(line)
            command = _strip_prefixes(line)
            if command is not None:
                found.append(DocCommand(f"{rel}:{number}", command))
            found.extend(DocCommand(f"{rel}:{number}", c) for c in inner)
        else:
            for span in re.findall(r"`([^`]+)`", raw):
                span = span.replace("\\|", "|")
                if span.startswith("minicloud "):
                    found.append(DocCommand(f"{rel}:{number}", _substitutions(span)[0]))
    return found


def _tokens(command: str) -> list[str]:
    command = re.sub(r"<[A-Za-z][^<>\s]*>", TOKEN, command)
    lexer = shlex.shlex(command, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for word in lexer:
        if word.startswith(SHELL_OPERATORS):
            break
        words.append(word)
    return words[1:]  # without `minicloud`


def _group(words: list[str]) -> list[object]:
    """Words with ``[`` … ``]`` groups nested as lists (brackets may touch words: ``[--force]``)."""
    split: list[str] = []
    for word in words:
        while word.startswith("[") and len(word) > 1:
            split.append("[")
            word = word[1:]
        closing = 0
        while word.endswith("]") and len(word) > 1 and "[" not in word:
            closing += 1
            word = word[:-1]
        split.append(word)
        split.extend("]" * closing)
    stack: list[list[object]] = [[]]
    for word in split:
        if word == "[":
            stack.append([])
        elif word == "]" and len(stack) > 1:
            group = stack.pop()
            stack[-1].append(group)
        else:
            stack[-1].append(word)
    while len(stack) > 1:  # an unclosed bracket: treat its contents as written
        group = stack.pop()
        stack[-1].extend(group)
    return stack[0]


def _flatten(grouped: list[object], include_optional: bool) -> list[str]:
    out: list[str] = []
    for item in grouped:
        if isinstance(item, list):
            if include_optional:
                out.extend(_flatten(item, include_optional))
        else:
            out.append(item)
    return out


def _alternatives(word: str) -> list[str]:
    """``qcow2|raw`` → both; a word with no ``|`` (or only a URL's) stays as it is."""
    if "|" not in word or "://" in word:
        return [word]
    return [part or TOKEN for part in word.split("|")]


def variants(command: str) -> list[list[str]]:
    """Every argument list the notation in ``command`` stands for (see the module docstring)."""
    grouped = _group(_tokens(command))
    result: list[list[str]] = []
    for include in (False, True):
        words = _flatten(grouped, include)
        choices = [_alternatives(w) for w in words]
        first = [c[0] for c in choices]
        result.append([TOKEN if w in ("…", "...") else w for w in first])
        for index, options in enumerate(choices):
            for option in options[1:]:
                result.append(
                    [TOKEN if w in ("…", "...") else w for w in [*first[:index], option, *first[index + 1 :]]]
                )
    unique = []
    for v in result:
        if v not in unique:
            unique.append(v)
    return unique


def parse_error(argv: list[str]) -> str | None:
    """None when the real parser accepts ``argv`` as written or with each metavariable (``N``, ``NAME``) as a number
    (``--vcpus N``); else what it said."""
    error = _parse_error(argv)
    if error is not None and _parse_error(["1" if METAVAR.fullmatch(w) else w for w in argv]) is None:
        return None
    return error


def _parse_error(argv: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):  # --help and --version exit 0
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


COMMANDS = [c for path in DOCS for c in extract(path)]


def _nouns() -> set[str]:
    parser = build_parser()
    return {name for action in parser._subparsers._group_actions for name in action.choices}  # type: ignore[union-attr]


def verb_lists(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """Inline spans naming a noun's verbs (`` `keypair import|list|show|delete` ``), one ``noun verb --help`` each."""
    nouns = _nouns()
    rel = path.relative_to(root).as_posix()
    found = []
    fenced = False
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for span in re.findall(r"`([^`]+)`", raw):
            m = re.fullmatch(r"([a-z][a-z-]*) ([a-z][a-z-]*(?:\\?\|[a-z][a-z-]*)*)", span)
            if m and m.group(1) in nouns:
                for verb in m.group(2).replace("\\", "").split("|"):
                    found.append(DocCommand(f"{rel}:{number}", f"minicloud {m.group(1)} {verb} --help"))
    return found


VERBS = [c for path in DOCS for c in verb_lists(path)]


def test_the_docs_have_commands_to_check() -> None:
    """The extraction still finds the documentation's command lines (an empty list would check nothing)."""
    assert len(COMMANDS) > 50
    assert any(c.where.startswith("docs/") for c in COMMANDS)
    assert len(VERBS) > 20


@pytest.mark.parametrize("command", VERBS, ids=[f"{c.where} {c.text[10:-7]}" for c in VERBS])
def test_documented_verb_exists(command: DocCommand) -> None:
    error = parse_error(_tokens(command.text))
    assert error is None, f"{command.where}: the docs name `{command.text[10:-7]}`, which does not exist: {error}"


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.text[:60]}" for c in COMMANDS])
def test_documented_command_parses(command: DocCommand) -> None:
    failures = []
    for argv in variants(command.text):
        error = parse_error(argv)
        if error is not None:
            failures.append(f"  minicloud {shlex.join(argv)}\n    {error}")
    assert not failures, f"{command.where}: `{command.text}` does not parse:\n" + "\n".join(failures)


# The extraction itself, on the notation the docs use.


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("minicloud node show   # CPUs, memory", [["node", "show"]]),
        ("$ minicloud completion bash > /etc/bash_completion.d/minicloud", [["completion", "bash"]]),
        ("minicloud admin backup /root/mc-$(date +%F).db", [["admin", "backup", "/root/mc-X.db"]]),
        ("minicloud operation show op-…  # or wait", [["operation", "show", "op-…"]]),
        ("minicloud join mcjoin1.…", [["join", "mcjoin1.…"]]),
        (
            "minicloud remote add n1 https://<this-host>:8443 --token <key>",
            [["remote", "add", "n1", "https://X:8443", "--token", "X"]],
        ),
        (
            "minicloud cluster add n2 [--role auto|voter]",
            [
                ["cluster", "add", "n2"],
                ["cluster", "add", "n2", "--role", "auto"],
                ["cluster", "add", "n2", "--role", "voter"],
            ],
        ),
        (
            "minicloud instance stop NAME [--force]",
            [["instance", "stop", "NAME"], ["instance", "stop", "NAME", "--force"]],
        ),
    ],
)
def test_variants_of_a_documented_line(line: str, expected: list[list[str]]) -> None:
    command, _ = _substitutions(line)
    stripped = _strip_prefixes(command)
    assert stripped is not None
    assert variants(stripped) == expected


def test_extract_reads_blocks_continuations_substitutions_and_inline_spans(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "Run `minicloud node show` first; `minicloud` alone is not a command line, nor is `cat x`.",
            "```sh",
            "MINICLOUD_PROJECT=web minicloud keypair list",
            "minicloud image import guest --kernel /k \\",
            "    --initrd /i",
            "curl http://$(minicloud -o json instance show vm1 | jq -r .ip)/",
            "```",
            "```toml",
            "minicloud = 1",
            "```",
        ]
    )
    probe = tmp_path / "docs" / "probe.md"
    probe.parent.mkdir()
    probe.write_text(text)
    found = [(c.where, c.text) for c in extract(probe, tmp_path)]
    assert found == [
        ("docs/probe.md:1", "minicloud node show"),
        ("docs/probe.md:3", "minicloud keypair list"),
        ("docs/probe.md:4", "minicloud image import guest --kernel /k --initrd /i"),
        ("docs/probe.md:6", "minicloud -o json instance show vm1 | jq -r .ip"),
    ]


def test_a_verb_or_option_the_cli_lacks_is_reported() -> None:
    assert parse_error(["keypair", "frobnicate", "--help"]) is not None
    assert parse_error(["instance", "create", "vm1", "--image", "i", "--type", "t", "--no-such-flag"]) is not None
    assert parse_error(["type", "create", "t", "--vcpus", "N", "--memory", "MIB", "--disk", "GIB"]) is None
