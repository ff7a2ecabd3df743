"""Every option and positional of every `mmfm` subcommand has help text: the test walks the
argparse tree, so an option added without `help=` fails here by name."""

import argparse

from mmfm.cli import _parser


def undocumented(parser: argparse.ArgumentParser, prog: str | None = None) -> list[str]:
    """`prog --option` (or the positional's name) of every action without help text, and of
    every subcommand without a one-line help in its parent's list, recursively."""
    prog = prog or parser.prog
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            documented = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                if name not in documented:
                    missing.append(f"{prog} {name} (no help in `{prog} --help`)")
                missing += undocumented(sub, f"{prog} {name}")
            continue
        if not (action.help and action.help.strip()):
            missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_and_positional_has_help():
    assert undocumented(_parser()) == []


def test_the_walk_finds_an_option_a_positional_and_a_subcommand_without_help():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--fine", help="documented")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="documented")
    run.add_argument("recipe")
    run.add_argument("--nodes", type=int)
    sub.add_parser("bare")
    assert undocumented(parser) == [
        "tool run recipe",
        "tool run --nodes",
        "tool bare (no help in `tool --help`)",
    ]
