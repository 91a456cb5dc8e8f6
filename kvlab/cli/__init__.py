"""The ``kvlab`` command line: a thin layer over the library (see ``kvlab --help``)."""
