"""An ``on_end`` that takes the conversation only."""


def on_end(conversation):
    pass


def handle(message, conversation):
    return "ok"
