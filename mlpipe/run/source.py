"""Turn a project URI into a local folder, and describe its git state without secrets.

mlpipe clones into a temporary folder itself: ``mlflow run --version REF`` on a local path
adds an ``origin`` remote to the user's repository and can flip ``core.bare``. The clone's
``origin`` is rewritten without credentials so that nothing downstream (MLflow's own
``mlflow.source.git.repoURL`` tag included, MLflow issue 5784) can read a token from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mlpipe.core.errors import SourceError

_SCP_LIKE = re.compile(r"^(?P<user>[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>(?!//).+)$")
_GIT_SCHEMES = ("https", "http", "ssh", "git", "git+ssh", "git+https", "file")


@dataclass(frozen=True)
class GitInfo:
    url: str | None
    commit: str | None
    dirty: bool | None
    branch: str | None = None


@dataclass
class ProjectSource:
    """A local project folder ready to run; ``cleanup()`` removes a temporary clone."""

    uri: str
    display_uri: str
    directory: Path
    git: GitInfo
    temporary: Path | None = None

    def cleanup(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def split_subdir(uri: str) -> tuple[str, str]:
    """``repo#sub/dir`` -> (``repo``, ``sub/dir``).

    Raises:
        SourceError: the subdirectory climbs out of the repository.
    """
    base, _, subdir = uri.partition("#")
    subdir = subdir.strip("/")
    if subdir and (os.path.isabs(subdir) or ".." in Path(subdir).parts):
        raise SourceError(
            f"Subdirectory {subdir!r} in {strip_credentials(uri)} must be a relative path "
            "inside the repository, e.g. #projects/seg3d."
        )
    return base, subdir


def is_git_url(uri: str) -> bool:
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in _GIT_SCHEMES:
        return True
    return bool(_SCP_LIKE.match(uri)) and not os.path.exists(uri)


def strip_credentials(url: str) -> str:
    """The URL with any user, password or token removed, fit for tags and logs.

    ``git@host:org/repo`` keeps its ``git@`` (the SSH user, not a secret); for URL forms any
    userinfo goes, since tokens are often passed as the user (``https://TOKEN@host/...``), and
    so does the query string.
    """
    base, sep, subdir = url.partition("#")
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme and parsed.netloc:
        host = parsed.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parsed.port:
            host = f"{host}:{parsed.port}"
        base = urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, "", ""))
    return base + (sep + subdir if sep else "")


def resolve_source(uri: str, version: str | None = None) -> ProjectSource:
    """Make ``uri`` (a folder, or a git URL with optional ``#subdir``) a local project folder.

    A git URL, or a local repository with ``--version``, is cloned into a temporary folder
    and ``version`` (branch, tag, full or short commit) checked out; the source repository is
    never touched. A local folder without ``--version`` runs in place.

    Raises:
        SourceError: the folder does not exist, the clone fails, or ``version`` is unknown.
    """
    base, subdir = split_subdir(uri)
    display = strip_credentials(uri)
    if version is not None and (not version.strip() or version.startswith("-")):
        raise SourceError(f"--version {version!r} is not a branch, tag or commit id.")
    local = _local_path(base)
    if local is not None and version is None:
        folder = (local / subdir).resolve()
        if not folder.is_dir():
            raise SourceError(f"Project folder {folder} does not exist.")
        return ProjectSource(uri, display, folder, describe_git(folder))
    if local is not None:
        top = _git(["rev-parse", "--show-toplevel"], cwd=local, check=False)
        if top.returncode != 0:
            raise SourceError(
                f"--version {version} needs a git repository, and {local} is not one. "
                "Drop --version to run the folder as it is."
            )
        # A folder inside a repository: clone the repository, keep the folder as #subdir.
        toplevel = Path(top.stdout.strip()).resolve()
        inner = local.resolve().relative_to(toplevel).as_posix()
        subdir = "/".join(p for p in (inner if inner != "." else "", subdir) if p)
        clone_from = toplevel.as_uri()
        return _clone(clone_from, version, subdir, uri, display, describe_git(toplevel).url)
    elif is_git_url(base):
        clone_from = base
    else:
        raise SourceError(
            f"Project {display!r} is neither an existing folder nor a git URL "
            "(https://, ssh://, git@host:org/repo, file://). Check the path or the URL."
        )
    return _clone(clone_from, version, subdir, uri, display)


def describe_git(folder: Path) -> GitInfo:
    """URL (credentials stripped), HEAD commit and dirty flag of the repository at ``folder``."""
    top = _git(["rev-parse", "--show-toplevel"], cwd=folder, check=False)
    if top.returncode != 0:
        return GitInfo(None, None, None)
    head = _git(["rev-parse", "--verify", "-q", "HEAD"], cwd=folder, check=False)
    commit = head.stdout.strip() if head.returncode == 0 else None  # None: no commit yet
    remote = _git(["config", "--get", "remote.origin.url"], cwd=folder, check=False)
    url = strip_credentials(remote.stdout.strip()) if remote.stdout.strip() else None
    if url is None:
        url = Path(top.stdout.strip()).as_uri()
    status = _git(["status", "--porcelain", "--", "."], cwd=folder, check=False)
    branch = _git(["symbolic-ref", "--short", "-q", "HEAD"], cwd=folder, check=False)
    return GitInfo(url, commit, bool(status.stdout.strip()), branch.stdout.strip() or None)


def _local_path(base: str) -> Path | None:
    if base.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(base).path))
        # A file:// URL of a git repository is cloned like any other git URL.
        if (path / ".git").exists() or path.suffix == ".git":
            return None
        return path if path.exists() else None
    path = Path(base).expanduser()
    return path if path.exists() else None


def _clone(
    source: str,
    version: str | None,
    subdir: str,
    uri: str,
    display: str,
    tag_url: str | None = None,
) -> ProjectSource:
    tmp = Path(tempfile.mkdtemp(prefix="mlpipe-src-"))
    dest = tmp / "repo"
    clean_url = strip_credentials(source)
    try:
        no_checkout = ["--no-checkout"] if version else []
        result = _git(["clone", "--quiet", *no_checkout, source, str(dest)], check=False)
        if result.returncode != 0:
            raise SourceError(
                f"Could not clone {clean_url}: {_redact(result.stderr, source).strip()}. "
                "Check the URL and that your git credentials (ssh key or credential helper) "
                "give access."
            )
        ref = version or "HEAD"
        if version:
            checkout = _git(["checkout", "--quiet", version], cwd=dest, check=False)
            if checkout.returncode != 0:
                raise SourceError(_unknown_ref_message(dest, version, clean_url))
        _git(["remote", "set-url", "origin", clean_url], cwd=dest)
        _git(["submodule", "update", "--init", "--recursive", "--quiet"], cwd=dest, check=False)
        folder = dest / subdir
        if not folder.is_dir():
            raise SourceError(f"Subdirectory {subdir!r} does not exist in {clean_url} at {ref}.")
        git = describe_git(folder)
        branch = version if version and _is_branch(dest, version) else git.branch
        info = GitInfo(tag_url or clean_url, git.commit, False, branch)
        return ProjectSource(uri, display, folder.resolve(), info, temporary=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unknown_ref_message(repo: Path, ref: str, url: str) -> str:
    branches = _git(["branch", "-r", "--format=%(refname:lstrip=3)"], cwd=repo, check=False)
    tags = _git(["tag", "--list"], cwd=repo, check=False)
    names = [b for b in branches.stdout.split() if b != "HEAD"]
    tag_names = tags.stdout.split()
    listed = (
        f"branches: {', '.join(names[:10]) or 'none'}; tags: {', '.join(tag_names[:10]) or 'none'}"
    )
    return (
        f"--version {ref} is not a branch, tag or commit of {url} ({listed}). "
        "Give one of those, or a full or short commit id."
    )


def _is_branch(repo: Path, ref: str) -> bool:
    return (
        _git(
            ["rev-parse", "--verify", "-q", f"refs/remotes/origin/{ref}"], cwd=repo, check=False
        ).returncode
        == 0
    )


def _redact(text: str, url: str) -> str:
    clean = strip_credentials(url)
    return text.replace(url, clean) if url != clean else text


def _git(
    args: list[str], cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    # GIT_TERMINAL_PROMPT=0: a private https repository fails at once instead of waiting for a
    # username on a terminal nobody watches.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise SourceError(
            "git is not installed; install git to run projects from git URLs."
        ) from exc
    if check and result.returncode != 0:
        raise SourceError(f"git {args[0]} failed: {result.stderr.strip()}")
    return result
