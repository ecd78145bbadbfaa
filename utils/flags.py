"""What every command line of the framework shares: help prefixes for reference flags that do nothing here, and
an ``ArgumentParser`` whose errors are one line."""
from __future__ import annotations

import argparse

IGNORED = "(ignored: dead flag in the reference code, accepted so published command lines run) "
NOT_IMPLEMENTED = "(not implemented: rejected unless left at the default) "


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block of ~150 flags would bury the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")
