"""Unit tests of mlpipe.source with real git repositories: in place, clones, versions, secrets."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from mlpipe.core.errors import SourceError
from mlpipe.run.source import is_git_url, resolve_source, split_subdir, strip_credentials
from tests.conftest import git

SUBDIR = "projects/good"


@pytest.fixture
def clone_tmp(tmp_path, monkeypatch):
    """Make tempfile (and so every clone) use a folder of this test, to see what is left."""
    folder = tmp_path / "clones"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def versioned_repo(git_repo):
    """A repo whose projects/good/VERSION differs on each ref.

    main: one (tag v1) -> two -> three (HEAD); feature: branched off one -> feature.
    Returns (repo, {label: full sha}).
    """
    repo = git_repo("good")
    marker = repo / SUBDIR / "VERSION"
    shas: dict[str, str] = {}

    def commit(label: str) -> None:
        marker.write_text(label)
        git("add", "-A", cwd=repo)
        git("commit", "-q", "-m", label, cwd=repo)
        shas[label] = git("rev-parse", "HEAD", cwd=repo)

    commit("one")
    git("tag", "v1", cwd=repo)
    commit("two")
    commit("three")
    git("checkout", "-q", "-b", "feature", shas["one"], cwd=repo)
    commit("feature")
    git("checkout", "-q", "main", cwd=repo)
    return repo, shas


def snapshot(repo: Path) -> dict[str, str]:
    """What `mlflow run --version` on a local path would change; must stay as it is."""
    return {
        "remote": git("remote", "-v", cwd=repo),
        "bare": git("config", "core.bare", cwd=repo),
        "status": git("status", "--porcelain", cwd=repo),
        "head": git("rev-parse", "HEAD", cwd=repo),
        "branch": git("symbolic-ref", "HEAD", cwd=repo),
        "refs": git("for-each-ref", cwd=repo),
        "config": git("config", "--local", "--list", cwd=repo),
    }


# strip_credentials, split_subdir, is_git_url -------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:token@host/org/repo.git", "https://host/org/repo.git"),
        ("https://TOKEN@host/x", "https://host/x"),
        (
            "https://u:p@host/org/repo.git#projects/seg3d",
            "https://host/org/repo.git#projects/seg3d",
        ),
        ("https://host/org/repo.git?private_token=abc", "https://host/org/repo.git"),
        ("https://u:p@host:8443/r.git?t=1#sub", "https://host:8443/r.git#sub"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
        ("ssh://user:pw@host/x", "ssh://host/x"),
        ("https://host/org/repo.git", "https://host/org/repo.git"),
        ("/local/path/repo", "/local/path/repo"),
    ],
)
def test_strip_credentials_removes_userinfo_and_query(url, expected):
    assert strip_credentials(url) == expected


def test_split_subdir_splits_fragment():
    assert split_subdir("https://h/r.git#projects/good/") == ("https://h/r.git", "projects/good")
    assert split_subdir("/some/repo") == ("/some/repo", "")


@pytest.mark.parametrize("uri", ["repo#../x", "repo#a/../../x"])
def test_split_subdir_rejects_climbing_out(uri):
    with pytest.raises(SourceError, match="must be a relative path inside the repository"):
        split_subdir(uri)


def test_split_subdir_error_hides_credentials():
    with pytest.raises(SourceError) as info:
        split_subdir("https://u:s3cret@host/r.git#../x")
    assert "s3cret" not in str(info.value)
    assert "https://host/r.git#../x" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://github.com/org/repo", True),
        ("git@github.com:org/repo.git", True),
        ("ssh://git@host/x", True),
        ("file:///srv/repo", True),
        ("projects/good", False),
        ("s3://bucket/x", False),
    ],
)
def test_is_git_url_recognises_git_forms(uri, expected):
    assert is_git_url(uri) is expected


# local folders ---------------------------------------------------------------------------------


def test_resolve_source_local_folder_runs_in_place(git_repo):
    repo = git_repo("good")
    source = resolve_source(str(repo / SUBDIR))
    assert source.temporary is None
    assert source.directory == (repo / SUBDIR).resolve()
    assert source.git.commit == git("rev-parse", "HEAD", cwd=repo)
    assert source.git.dirty is False
    assert source.git.branch == "main"
    assert source.git.url == repo.resolve().as_uri()
    source.cleanup()
    assert (repo / SUBDIR / "MLproject").is_file()


def test_resolve_source_local_repo_with_subdir_fragment_runs_in_place(git_repo):
    repo = git_repo("good")
    source = resolve_source(f"{repo}#{SUBDIR}")
    assert source.temporary is None
    assert source.directory == (repo / SUBDIR).resolve()


def test_resolve_source_local_edited_tracked_file_is_dirty(git_repo):
    repo = git_repo("good")
    with (repo / SUBDIR / "train.py").open("a") as fh:
        fh.write("# local edit\n")
    source = resolve_source(str(repo / SUBDIR))
    assert source.git.dirty is True


def test_resolve_source_local_folder_outside_git_has_no_git_info(project_dir):
    folder = project_dir("good")
    source = resolve_source(str(folder))
    assert source.directory == folder.resolve()
    assert (source.git.url, source.git.commit, source.git.dirty) == (None, None, None)


def test_resolve_source_missing_subdir_of_local_folder_raises(git_repo):
    repo = git_repo("good")
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(f"{repo}#projects/nope")


def test_resolve_source_nonexistent_path_raises(tmp_path):
    with pytest.raises(SourceError, match="neither an existing folder nor a git URL"):
        resolve_source(str(tmp_path / "does" / "not" / "exist"))


def test_resolve_source_version_on_non_git_folder_raises(project_dir):
    folder = project_dir("good")
    with pytest.raises(SourceError, match="needs a git repository") as info:
        resolve_source(str(folder), version="main")
    assert str(folder) in str(info.value)


@pytest.mark.parametrize("version", ["", "  ", "-x", "--upload-pack=touch"])
def test_resolve_source_rejects_option_like_or_empty_version(git_repo, version):
    repo = git_repo("good")
    with pytest.raises(SourceError, match="is not a branch, tag or commit id"):
        resolve_source(str(repo), version=version)


# clones -----------------------------------------------------------------------------------------


def test_resolve_source_file_url_clones_into_temporary_folder(git_repo, clone_tmp):
    repo = git_repo("good")
    url = f"{repo.as_uri()}#{SUBDIR}"
    source = resolve_source(url)
    try:
        assert source.temporary is not None
        assert source.temporary.parent == clone_tmp
        assert source.directory != (repo / SUBDIR).resolve()
        assert source.directory.is_relative_to(source.temporary)
        assert source.directory.name == "good"
        assert (source.directory / "MLproject").is_file()
        assert source.git.commit == git("rev-parse", "HEAD", cwd=repo)
        assert source.git.url == repo.as_uri()
        assert source.git.dirty is False
        assert source.display_uri == url
    finally:
        temporary = source.temporary
        source.cleanup()
    assert not temporary.exists()
    assert source.temporary is None
    source.cleanup()  # a second cleanup is harmless
    assert (repo / SUBDIR / "MLproject").is_file()


def test_resolve_source_default_checks_out_head(versioned_repo):
    repo, shas = versioned_repo
    source = resolve_source(f"{repo.as_uri()}#{SUBDIR}")
    try:
        assert (source.directory / "VERSION").read_text() == "three"
        assert source.git.commit == shas["three"]
    finally:
        source.cleanup()


@pytest.mark.parametrize(
    ("version", "expected", "branch"),
    [
        ("feature", "feature", "feature"),
        ("main", "three", "main"),
        ("v1", "one", None),
    ],
)
def test_resolve_source_version_checks_out_branch_or_tag(versioned_repo, version, expected, branch):
    repo, shas = versioned_repo
    source = resolve_source(f"{repo}#{SUBDIR}", version=version)
    try:
        assert source.temporary is not None
        assert (source.directory / "VERSION").read_text() == expected
        assert source.git.commit == shas[expected]
        assert source.git.branch == branch
    finally:
        source.cleanup()


def test_resolve_source_version_full_sha(versioned_repo):
    repo, shas = versioned_repo
    source = resolve_source(f"{repo.as_uri()}#{SUBDIR}", version=shas["two"])
    try:
        assert (source.directory / "VERSION").read_text() == "two"
        assert source.git.commit == shas["two"]
    finally:
        source.cleanup()


def test_resolve_source_version_short_sha(versioned_repo):
    repo, shas = versioned_repo
    source = resolve_source(f"{repo}#{SUBDIR}", version=shas["feature"][:7])
    try:
        assert (source.directory / "VERSION").read_text() == "feature"
        assert source.git.commit == shas["feature"]
    finally:
        source.cleanup()


def test_resolve_source_unknown_version_lists_branches_and_tags(versioned_repo, clone_tmp):
    repo, _ = versioned_repo
    with pytest.raises(SourceError) as info:
        resolve_source(f"{repo}#{SUBDIR}", version="nosuchref")
    message = str(info.value)
    assert "--version nosuchref is not a branch, tag or commit" in message
    assert "branches: feature, main" in message
    assert "tags: v1" in message
    assert list(clone_tmp.iterdir()) == []  # the failed clone was removed


def test_resolve_source_missing_subdir_in_clone_raises_and_cleans_up(versioned_repo, clone_tmp):
    repo, _ = versioned_repo
    with pytest.raises(SourceError, match=r"Subdirectory 'projects/nope' does not exist"):
        resolve_source(f"{repo}#projects/nope", version="main")
    assert list(clone_tmp.iterdir()) == []


def test_resolve_source_local_repo_with_version_leaves_source_unchanged(versioned_repo):
    repo, shas = versioned_repo
    (repo / "untracked.txt").write_text("keep me")
    before = snapshot(repo)
    assert before["remote"] == ""
    assert before["bare"] == "false"
    for version in ("feature", "v1", shas["two"], shas["two"][:7]):
        source = resolve_source(f"{repo}#{SUBDIR}", version=version)
        source.cleanup()
    assert snapshot(repo) == before
    assert (repo / SUBDIR / "VERSION").read_text() == "three"
    assert (repo / "untracked.txt").read_text() == "keep me"


def test_resolve_source_clone_origin_has_no_credentials(versioned_repo):
    repo, _ = versioned_repo
    source = resolve_source(f"{repo}#{SUBDIR}", version="main")
    try:
        origin = git("config", "remote.origin.url", cwd=source.directory)
        assert origin == repo.resolve().as_uri()
        assert source.git.url == origin
    finally:
        source.cleanup()


def test_resolve_source_clone_failure_hides_credentials(clone_tmp):
    url = "https://user:s3cret@127.0.0.1:9/repo.git"
    with pytest.raises(SourceError) as info:
        resolve_source(f"{url}#projects/good", version="main")
    message = str(info.value)
    assert message.startswith("Could not clone https://127.0.0.1:9/repo.git:")
    assert "s3cret" not in message
    assert "user:" not in message
    assert list(clone_tmp.iterdir()) == []


def test_resolve_source_version_on_subfolder_of_repo(versioned_repo):
    repo, _ = versioned_repo
    source = resolve_source(str(repo / SUBDIR), version="feature")
    try:
        assert (source.directory / "VERSION").read_text() == "feature"
    finally:
        source.cleanup()


def test_resolve_source_relative_local_repo_records_absolute_url(versioned_repo, tmp_path):
    repo, _ = versioned_repo
    assert repo.parent == tmp_path  # the cwd, so "repo" is a relative path to it
    in_place = resolve_source(f"repo#{SUBDIR}")
    cloned = resolve_source(f"repo#{SUBDIR}", version="main")
    try:
        assert cloned.git.url == in_place.git.url
    finally:
        cloned.cleanup()
