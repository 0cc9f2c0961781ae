"""Storage passwords kept out of every message.

Credentials come from the environment (``--storage '${FAIRFRONT_STORAGE}'``). Every URL the storage
opens is remembered (:func:`register_secret`), and :func:`redact` / :class:`RedactingFilter` replace
its password in log records and error messages, including the ones SQLAlchemy and the drivers
raise; :func:`mask_url` is what messages show of a URL.
"""

from __future__ import annotations

import contextlib
import logging
import re

from sqlalchemy.engine import make_url

from model.typed_config import ENV_REFERENCE

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<password>[^@\s'\"]+)(?=@)")
_secrets: set[str] = set()
_MIN_SECRET = 4  # shorter passwords are masked only inside URLs, not as free text


def register_secret(url: str) -> None:
    """Remember the password of ``url`` (raw and decoded) so :func:`redact` removes it anywhere."""
    match = _URL_PASSWORD.search(url)
    candidates = {match.group("password")} if match else set()
    with contextlib.suppress(Exception):
        candidates.add(make_url(url).password or "")
    _secrets.update(s for s in candidates if len(s) >= _MIN_SECRET)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what logs and messages show); a password
    given as a ``${VAR}`` reference is no secret and stays."""
    return _URL_PASSWORD.sub(lambda m: m.group(0) if ENV_REFERENCE.fullmatch(m.group("password")) else f"{m.group('head')}***", url)


def redact(text: object) -> str:
    """``str(text)`` with every URL password and every registered secret replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***", str(text))
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts the formatted message and traceback of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Add a :class:`RedactingFilter` to every handler of the root logger and of Optuna's own."""
    for logger in (logging.getLogger(), logging.getLogger("optuna")):
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


__all__ = ["RedactingFilter", "install_log_redaction", "mask_url", "redact", "register_secret"]
