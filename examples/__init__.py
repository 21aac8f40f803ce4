"""Example conversation handlers, each with its own tests."""
