"""A handler that takes the message only."""


def handle(message):
    return "never"
