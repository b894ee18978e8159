"""What the command line tells its user: help texts, the settings each command reads, one-line usage errors.

The settings listed under each command's --help come from Settings' fields (name, default, description), grouped
by the sections of backend/settings.py; nothing here repeats a description.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from backend.settings import Settings

# The installed distribution whose version `--version` prints and workers announce.
DISTRIBUTION = "label-studio-grounded-sam"

DESCRIPTION = """\
A Label Studio ML backend that pre-labels images from text: Grounding DINO finds the objects the project's
labels name, SAM draws their masks, and Label Studio shows them as predictions to review. Start with `serve`
and connect Label Studio to http://THIS-MACHINE:9090; try the models on local files with `predict`.
"""

EPILOG = """\
Every setting is an environment variable, e.g. `PORT=9091 BOX_THRESHOLD=0.4 grounded-sam serve`.
`grounded-sam COMMAND --help` lists the ones that command reads; README.md ("Configuration") lists all.
"""

# The sections of Settings, each named with its first field (fields are declared in this order).
SECTIONS = (
    ("HTTP", "host"),
    ("Queue", "redis_url"),
    ("Models", "detector_model"),
    ("Post-processing and output", "min_area"),
    ("Images", "label_studio_url"),
)
_ALL = tuple(title for title, _ in SECTIONS)
_HTTP_CLIENT = ("port", "basic_auth_user", "basic_auth_pass", "log_level")
# What each command reads: section titles (all their fields) or field names.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "serve": _ALL,
    "worker": ("log_level", "Queue", "Models", "Post-processing and output", "Images"),
    "predict": ("log_level", "Models", "Post-processing and output", "image_max_bytes", "image_max_pixels"),
    "health": ("host", *_HTTP_CLIENT, "worker_heartbeat", "worker_heartbeat_file"),
    "prelabel": (*_HTTP_CLIENT, "label_studio_url", "label_studio_api_key", "label_studio_timeout"),
    "status": _HTTP_CLIENT,
    "retry": _HTTP_CLIENT,
    "report": (
        "log_level",
        "redis_url",
        "queue_name",
        "review_min_reviews",
        "label_studio_url",
        "label_studio_api_key",
        "label_studio_timeout",
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, "error: ... (see PROG --help)", exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def usage_error(message: str) -> int:
    """Print a usage mistake as one line on stderr; the exit code of a usage error (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def package_version() -> str:
    """The installed version of this package; "unknown" in a source tree that was never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def settings_by_section() -> dict[str, list[str]]:
    """Section title → the Settings field names in it, in declaration order."""
    starts = {field: title for title, field in SECTIONS}
    sections: dict[str, list[str]] = {title: [] for title, _ in SECTIONS}
    title = SECTIONS[0][0]
    for name in Settings.model_fields:
        title = starts.get(name, title)
        sections[title].append(name)
    return sections


def command_fields(command: str) -> list[str]:
    """The Settings field names `command` reads, in declaration order. KeyError for an unknown entry."""
    sections = settings_by_section()
    wanted: set[str] = set()
    for entry in COMMAND_SETTINGS[command]:
        if entry in sections:
            wanted.update(sections[entry])
        elif entry in Settings.model_fields:
            wanted.add(entry)
        else:
            raise KeyError(f"{command}: {entry!r} is neither a Settings field nor a section")
    return [name for name in Settings.model_fields if name in wanted]


def settings_help(command: str, width: int = 100) -> str:
    """The epilog of `command --help`: each setting it reads as VARIABLE (default), then its description."""
    lines = ["settings (environment variables; README.md, Configuration):"]
    for name in command_fields(command):
        field = Settings.model_fields[name]
        default = "unset" if field.default is None else f"default {field.default}"
        lines.append(f"  {name.upper()} ({default})")
        lines.extend(textwrap.wrap(field.description or "", width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def add_command(
    commands: argparse._SubParsersAction[OneLineParser], name: str, help_text: str, description: str | None = None
) -> OneLineParser:
    """A subcommand whose --help ends with the settings it reads."""
    parser: OneLineParser = commands.add_parser(
        name,
        help=help_text,
        description=description or help_text[:1].upper() + help_text[1:] + ".",
        epilog=settings_help(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def top_parser(prog: str) -> OneLineParser:
    """The `grounded-sam` parser: the user-facing description, --version, one-line usage errors."""
    parser = OneLineParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser
