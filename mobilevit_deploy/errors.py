"""Errors meant for people, each carrying the exit code the CLI returns for it.

The CLI never shows a traceback for these: the message is the whole story, so it
must name the file, key or option at fault and what to do about it.
"""


class MvdError(Exception):
    """Base of every error the tool reports to a user; exit code 2 (bad input)."""

    exit_code = 2


class BadInput(MvdError):
    """The user gave something unusable: unknown model, unreadable file, bad size."""

    exit_code = 2


class CheckpointMismatch(BadInput):
    """A checkpoint does not fit the model; the message lists keys by name."""


class BackendUnavailable(MvdError):
    """An optional backend is not installed; the message names the extra to install."""

    exit_code = 3


class ExportFailed(MvdError):
    """A format's converter could not make a file of the model (or made one that its
    runtime cannot run): the message names the op or the stage where it can."""


class VerificationFailed(MvdError):
    """A deployable artifact does not compute the same function as the original."""

    exit_code = 1


def one_line(text: str, limit: int = 300) -> str:
    """A converter's message in one line within `limit`: its first line, cut in the
    middle if need be, since converters put the cause last ("Failed to get quantization
    parameters for tensor: <a 500-character name>. Error: <the cause>")."""
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= limit:
        return line
    half = (limit - 5) // 2
    return f"{line[:half]} ... {line[-half:]}"
