"""MkDocs hooks (mkdocs.yml ``hooks:``).

- The CLI reference is generated at build time from the parser the ``fxlop`` command builds
  (``fxlop.cli._parser()``, whose ``run`` flags come from the settings classes), so it cannot drift:
  ``docs/reference/cli.md`` holds only the marker ``<!-- cli-reference -->``.
- The benchmarks' figures stay where the benchmarks write them (``benchmarks/results/*.png``); they
  are added to the site under ``results/figures/``. Their tables are included by pymdownx.snippets
  (``--8<-- "recovery.md"``, base path ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- cli-reference -->"


def on_files(files, config):
    for figure in sorted(RESULTS.glob("*.png")):
        if figure.stem.endswith("_quick"):
            continue
        files.append(File.generated(config, f"results/figures/{figure.name}", abs_src_path=str(figure)))
    return files


def on_page_markdown(markdown: str, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown


def cli_reference() -> str:
    from fxlop.cli import _parser

    parser = _parser()
    out = [f"`{parser.prog}`: {parser.description}", ""]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, sub in commands.choices.items():
        out += [f"## `fxlop {name}`", "", _sentence(sub.description or helps.get(name) or ""), "",
                "```text", sub.format_usage().strip(), "```", ""]
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
            out += [f"### {title}", "", "| flag | default | help |", "|---|---|---|"]
            out += [_row(action) for action in actions]
            out.append("")
    return "\n".join(out)


def _row(action: argparse.Action) -> str:
    flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    if action.option_strings and action.nargs != 0:
        metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else
                                     action.dest.upper())
        flag += f" `{metavar}{' ...' if action.nargs in ('+', '*') else ''}`"
    if action.required and action.option_strings:
        default = "required"
    elif action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
        default = ""
    else:
        default = f"`{' '.join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default}`"
    text = (action.help or "") % {**vars(action), "prog": "fxlop"} if action.help and "%(" in action.help else action.help or ""
    return f"| {flag} | {default} | {_cell(text)} |"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") or not text else ".")
