"""What the commands share: the progress bar, one-line errors, and argparse options offered as beets options."""

from __future__ import annotations

import argparse
import contextlib
import optparse
import re
import sys

from beets.ui import UserError

from ..errors import CrnnError


@contextlib.contextmanager
def user_errors(prefix: str = ""):
    """A CrnnError inside the block becomes beets' one-line UserError."""
    try:
        yield
    except CrnnError as exc:
        raise UserError(prefix + str(exc)) from None


def one_line(text: str) -> str:
    """A library's multi-line error (Keras prints whole tensors) as one line that keeps the gist."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    shapes = re.search(r"variable\.shape=\([^)]*\),? Received: value\.shape=\([^)]*\)", text)
    return lines[0].rstrip(":") + (f" ({shapes.group(0)})" if shapes else "")


def progress(total, quiet=False):
    """tqdm on a terminal; a no-op in pipes, with -q, or when tqdm is absent."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="track", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def yaml_scalar(text: str) -> str:
    """A path as a YAML flow scalar: plain when it can be, else single-quoted."""
    if re.fullmatch(r"[\w./~+-][\w ./~+@-]*", text) and not text.endswith(" "):
        return text
    return "'" + text.replace("'", "''") + "'"


def adopt_argparse(optparser, argparser) -> None:
    """Offer an argparse parser's options on a beets (optparse) subcommand, so both CLIs share one definition.

    Each argparse argument group becomes an option group under its own title. The argparse parser
    stays the one that parses (``argv_from`` turns the beets options back into its argv).
    """
    groups = {}
    for group in argparser._action_groups:
        for action in group._group_actions:
            groups[action] = group
    for action in argparser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kwargs = {"dest": action.dest, "default": None, "help": action.help}
        if action.nargs == 0:
            kwargs["action"] = "store_true"
        elif isinstance(action, argparse._AppendAction):  # a repeatable option stays repeatable
            kwargs.update(action="append", type="string")
        else:
            kwargs["type"] = {int: "int", float: "float"}.get(action.type, "string")
        if action.choices:
            kwargs.update(type="choice", choices=list(action.choices))
        if action.metavar:
            kwargs["metavar"] = action.metavar
        group = groups.get(action)
        target = optparser
        if group is not None and group.title not in ("options", "optional arguments", "positional arguments"):
            target = next((g for g in optparser.option_groups if g.title == group.title), None)
            if target is None:
                target = optparse.OptionGroup(optparser, group.title, group.description)
                optparser.add_option_group(target)
        target.add_option(*action.option_strings, **kwargs)
    positionals = [a.metavar or a.dest.upper() for a in argparser._actions if not a.option_strings]
    optparser.usage = f"%prog [options] {' '.join(positionals)}"


def argv_from(opts, args) -> list:
    """Turn parsed optparse options back into argv for the argparse parser they were adopted from."""
    argv = list(args)
    for key, value in vars(opts).items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag] if value is True else [flag, str(value)]
    return argv
