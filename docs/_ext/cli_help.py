"""``.. ppvi-help:: COMMAND``: the output of ``ppvi COMMAND --help`` as a literal block, so that the command-line
reference is the parser itself and cannot drift from it (``.. ppvi-help::`` with no argument: ``ppvi --help``)."""

from __future__ import annotations

import contextlib
import io
import os

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx

#: Width of the rendered help (argparse reads $COLUMNS).
COLUMNS = "100"


def help_text(command: list[str]) -> str:
    """What ``ppvi COMMAND --help`` prints."""
    from ppvi.cli import main

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
            main([*command, "--help"])
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return output.getvalue().rstrip()


class PpviHelp(Directive):
    optional_arguments = 2
    has_content = False

    def run(self) -> list[nodes.Node]:
        command = list(self.arguments)
        text = f"$ ppvi {' '.join(command + ['--help'])}\n" + help_text(command)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Sphinx) -> dict:
    app.add_directive("ppvi-help", PpviHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
