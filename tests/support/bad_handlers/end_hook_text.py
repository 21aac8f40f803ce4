"""An ``on_end`` that is not a function."""

on_end = "send a survey"


def handle(message, conversation):
    return "ok"
