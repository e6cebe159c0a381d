"""One way to keep credentials off the screen: mask them in URIs and in any text.

Every place that prints, logs or passes on a URI calls :func:`mask_uri`; every message that
quotes what a library said about a URI (a DSN parse error, a failed connection naming the host
it tried) goes through :func:`scrub`, which also removes the secret parts of the URIs the caller
knows about. ``mlpipe.core.settings.redact_uri`` is :func:`mask_uri`, kept for its callers.

Imports only the standard library, so any module (the CLI included) can use it.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence

MASK = "***"

SECRET_QUERY_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "access_token",
        "auth_token",
        "api_key",
        "apikey",
        "access_key",
        "secret_key",
        "aws_secret_access_key",
        "aws_session_token",
        "sslpassword",
        "sslkey",
        "client_secret",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "credential",
        "credentials",
    }
)
"""Query or keyword names whose values are secrets (compared lower-case)."""


_KEY_PATTERN = "|".join(sorted((re.escape(k) for k in SECRET_QUERY_KEYS), key=len, reverse=True))


# ``password=X`` in a query string, a libpq keyword/value DSN or a message; ``"password": "X"``.
_KEYWORD = re.compile(
    rf"(?i)(?P<key>\b(?:{_KEY_PATTERN}))(?P<sep>\s*[=:]\s*['\"]?)(?P<value>[^\s&;'\",)]+)"
)


# ``scheme://userinfo@`` anywhere in a text; userinfo may hold an unencoded '@' (up to the last
# '@' before the host) but no whitespace or '/'.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)(?P<userinfo>[^\s/?#]*)@")


def mask_uri(uri: str | None) -> str:
    """The URI fit to print, log or put in a tag: userinfo and secret query values masked.

    ``postgresql://u:pw@h/db?sslpassword=x`` becomes ``postgresql://***@h/db?sslpassword=***``.
    A password holding an unencoded ``@`` is masked whole (the host is what follows the last
    ``@``). Text that is not a URI is returned with secret ``key=value`` pairs masked.

    Args:
        uri: any URI, or None.

    Returns:
        The masked URI ("" for None or "").
    """
    if not uri:
        return ""
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:  # e.g. an invalid IPv6 netloc: mask what looks like credentials
        return _scrub_patterns(uri)
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    query = parsed.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = "&".join(
                f"{urllib.parse.quote(k, safe='')}="
                + (MASK if k.lower() in SECRET_QUERY_KEYS else urllib.parse.quote(v, safe=""))
                for k, v in pairs
            )
    # Replaced in the text rather than rebuilt with urlunsplit, which would turn
    # ``sqlite:////abs/path`` (an empty netloc) into ``sqlite://abs/path``.
    masked = uri
    if netloc != parsed.netloc:
        masked = masked.replace("//" + parsed.netloc, "//" + netloc, 1)
    if query != parsed.query:
        masked = masked.replace("?" + parsed.query, "?" + query, 1)
    return _scrub_patterns(masked) if not parsed.scheme else masked


def secret_parts(uri: str | None) -> list[str]:
    """The secret substrings of a URI (password, its '@'-separated pieces, secret query values).

    What :func:`scrub` removes from a message that may quote them in any form: a library that
    split the URI at the first ``@`` prints the password's tail as part of the host name.
    """
    if not uri:
        return []
    parts: list[str] = []
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        return []
    if "@" in parsed.netloc:
        userinfo = parsed.netloc.rpartition("@")[0]
        password = userinfo.partition(":")[2]
        # Without a password, the user part may itself be the secret (https://TOKEN@host).
        text = password or userinfo
        parts += [text, urllib.parse.unquote(text)]
        parts += [piece for piece in re.split(r"[@:]", text) if len(piece) >= 3]
    for key, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS and value:
            parts.append(value)
            parts.append(urllib.parse.quote(value, safe=""))
    # Longest first, so that a piece does not leave a longer secret half-masked.
    return sorted({p for p in parts if p}, key=len, reverse=True)


def scrub(text: str, uris: Iterable[str | None] = (), secrets: Iterable[str] = ()) -> str:
    """``text`` with the secret parts of ``uris``, the given ``secrets``, any credentials in a
    URI and any ``password=...``-like value replaced by ``***``.

    Args:
        text: a message, often one a library built around a URI.
        uris: URIs whose secret parts must not appear (see :func:`secret_parts`).
        secrets: other literal secrets (a password from the environment).

    Returns:
        The text, safe to print.
    """
    known: list[str] = [s for s in secrets if s and s.strip()]
    for uri in uris:
        known.extend(secret_parts(uri))
    for secret in sorted(set(known), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _scrub_patterns(text)


def has_secret(uri: str | None) -> bool:
    """Whether the URI carries a password (userinfo) or a secret query parameter."""
    if not uri:
        return False
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        return False
    if parsed.password:
        return True
    return any(
        k.lower() in SECRET_QUERY_KEYS and v
        for k, v in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
    )


def _scrub_patterns(text: str) -> str:
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _KEYWORD.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


REEXEC_ENV = "MLPIPE_SECRETS_MOVED"
"""Set in the re-executed process so that it never re-executes again."""


def argv_without(argv: Sequence[str], flags: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` with every ``--flag VALUE`` / ``--flag=VALUE`` of ``flags`` removed.

    Args:
        argv: the command line after the program (``sys.argv[1:]``).
        flags: option -> the environment variable the same option reads.

    Returns:
        The remaining arguments and the environment variables that now carry the values.
    """
    rest: list[str] = []
    moved: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "--":
            rest += args[i:]
            break
        if eq and name in flags:
            moved[flags[name]] = value
        elif arg in flags and i + 1 < len(args):
            moved[flags[arg]] = args[i + 1]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, moved


def reexec_without_secrets(
    flags: Mapping[str, str], warn: Callable[[str], None], module: str = "mlpipe.cli"
) -> None:
    """Re-execute this process with secret-bearing options moved into its environment.

    A password on the command line is readable by every user of the machine for as long as
    the process runs (``ps``, ``/proc/PID/cmdline``), and Python cannot portably overwrite
    its own argv: so the process replaces itself (same PID, ``os.execve``) with the options
    taken out and the values put in the environment variables the same options read, which
    only the same user can see. Does nothing when no such option holds a secret, when the
    values are not in ``sys.argv`` (a library call, a test runner), or when already done.

    Args:
        flags: option -> environment variable the option also reads.
        warn: prints the warning that says how to pass the value safely next time.
        module: what ``python -m`` runs again.
    """
    import os
    import sys

    if os.environ.get(REEXEC_ENV):
        return
    rest, moved = argv_without(sys.argv[1:], flags)
    secret = {name: value for name, value in moved.items() if has_secret(value)}
    if not secret:
        return
    names = ", ".join(sorted(secret))
    warn(
        "a password was given on the command line, where every user of this machine can read "
        f"it (ps, /proc) while the server runs; mlpipe moved it into its environment ({names}) "
        "and restarted itself. Next time export it instead, or keep it out of the URI and set "
        "PGPASSWORD or a ~/.pgpass file (PGPASSFILE)."
    )
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, **moved, REEXEC_ENV: "1"}
    os.execve(sys.executable, [sys.executable, "-m", module, *rest], env)
