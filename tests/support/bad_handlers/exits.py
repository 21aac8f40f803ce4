"""Calls ``sys.exit(0)`` when imported (a script's habit)."""

import sys

sys.exit(0)


def handle(message, conversation):
    return "never"
