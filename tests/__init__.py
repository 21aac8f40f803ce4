"""The test suite; a package so that ``bench/`` imports the same launchers (``tests.support``)."""
