"""``minicloud completion bash``: a completion script generated from the parser itself."""

from __future__ import annotations

import argparse

SCRIPT = """# bash completion for minicloud; install with:
#   minicloud completion bash > /etc/bash_completion.d/minicloud
_minicloud() {
    local cur noun i words
    cur="${COMP_WORDS[COMP_CWORD]}"
    noun=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -*) ;;
            *) if [[ -z "$noun" ]]; then noun="${COMP_WORDS[i]}"; fi ;;
        esac
    done
    if [[ "$cur" == -* ]]; then
        words="%(globals)s"
    elif [[ -z "$noun" ]]; then
        words="%(nouns)s"
    else
        case "$noun" in
%(cases)s
        esac
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _minicloud minicloud
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(func=completion)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def completion(args: argparse.Namespace) -> int:
    from minicloud.cli.main import build_parser

    root = build_parser()
    nouns = _subparsers(root)
    cases = []
    for noun, parser in nouns.items():
        verbs = " ".join(_subparsers(parser))
        cases.append(f'            {noun}) words="{verbs}" ;;')
    flags = " ".join(o for a in root._actions for o in a.option_strings)
    print(SCRIPT % {"globals": flags, "nouns": " ".join(nouns), "cases": "\n".join(cases)}, end="")
    return 0
