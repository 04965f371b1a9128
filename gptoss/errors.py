"""The one exception type that the command line turns into a one-line message."""


class GptOssError(Exception):
    """A user-facing error (bad input, a missing file, a failed check) naming the file or tensor and what is wrong;
    the CLI prints it on one line, without a traceback, and exits with status 1."""
