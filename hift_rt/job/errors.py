"""The job's one kind of failure: JobError, a problem with the user's input or with the run,
reported by the command line as one `hift-rt: error:` line (exit code 2).

Owns: JobError and how another exception is shown in its line (first_line). May call nothing.
"""


class JobError(Exception):
    """A problem with the user's input or with the run, reported as one line."""


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for quoting a library's exception in a JobError."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
