"""Hugging Face model IDs (`org/name`, `org/name@revision`) resolved offline from the local hub cache.

pymerge never downloads: an ID names a snapshot that `hf download` (`huggingface-cli download` before
huggingface_hub 1.0, or any transformers/mergekit run) already put in the cache, laid out as
    <cache>/models--org--name/refs/<branch>          (a file holding a commit hash)
    <cache>/models--org--name/snapshots/<commit>/    (the files)
The cache is HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (huggingface_hub's own order; ~ and $VARS
expanded, as it expands them). Without
@revision the `main` ref is used, else the only snapshot there is where no other ref names it (one
downloaded by its hash); a revision is a branch or tag (which
may hold '/': refs/pr/1, feature/x), or a commit hash or a unique prefix of at least 4 hex digits (as git takes).
"""
import os
import re
from pathlib import Path
from typing import Optional

from pymerge.errors import MergeConfigError

_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MAX_ID = 200  # characters of org/name, beyond the Hub's own limit (96)
_MAX_REV = 255  # characters of a revision (a file name under refs/; a longer one raised ENAMETOOLONG, echoed whole)
_LEGACY = re.compile(r"[A-Za-z0-9][\w.]*(-[\w.]+)*")  # an org-less ID: no '--' (the cache's separator)
_HASH_PREFIX = re.compile(r"[0-9a-f]{4,40}")  # a commit hash, or a prefix of one git would take
_COMMIT = re.compile(r"(?!\.{1,2}$)[\w.-]+")  # one snapshot folder's name (huggingface_hub: 40 hex digits)
_REV = re.compile(r"(?!\.{1,2}(/|$))[\w.-]+(/(?!\.{1,2}(/|$))[\w.-]+)*")  # no '.' or '..' part: refs/ stays below


def looks_like_id(ref: str) -> bool:
    """True for `org/name` or `org/name@revision` (and not an existing local path), or a legacy ID without an
    org (`gpt2`, `bert-base-uncased`) that is in the cache (mergekit takes those; without the cache, such a name
    stays a local path not found)."""
    name, _, rev = ref.partition("@")
    if len(name) > _MAX_ID or len(rev) > _MAX_REV or rev and not _REV.fullmatch(rev) or os.path.exists(ref):
        return False  # (the Hub's IDs are at most 96 characters: a 100,000-character one was echoed whole)
    if _ID.fullmatch(name):
        return True
    return bool(_LEGACY.fullmatch(name)) and _is_dir(cache_dir() / f"models--{name}" / "snapshots")


def _is_dir(path: Path) -> bool:
    """Path.is_dir, False where the name cannot be looked up at all (a 100,000-character name: ENAMETOOLONG,
    which is_dir raises, and the error echoed the whole path)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def revision_on_folder(path: str) -> Optional[str]:
    """Why a path that is not there is a local folder given a revision (./m@main, {path: ./m, revision: main}),
    or None (no such folder, or the '@' belongs to a real name: runs/exp@lr3/step100 under runs/exp@lr3)."""
    folder, _, rev = path.rpartition("@")
    if not folder or not os.path.isdir(folder) or os.path.exists(f"{folder}@{rev.split('/')[0]}"):
        return None
    return f"{folder} is a local folder; a revision (@{rev}) applies to Hugging Face model IDs only: drop it"


def cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return _expanded(os.environ[var])
    if os.environ.get("HF_HOME"):
        return _expanded(os.environ["HF_HOME"]) / "hub"
    return _expanded(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface" / "hub"


def _expanded(value: str) -> Path:
    """huggingface_hub's expansion of its path variables (~, then $VARS): HF_HOME='$SCRATCH/hf' is one folder."""
    return Path(os.path.expandvars(os.path.expanduser(value)))


def resolve(ref: str) -> str:
    """The local snapshot folder of a cached model ID; MergeConfigError naming the ID if not cached."""
    name, _, rev = ref.partition("@")
    if rev and not _REV.fullmatch(rev):
        raise MergeConfigError(f"model {ref}: {rev!r} is not a revision (a branch, tag or commit)")
    root = cache_dir() / ("models--" + name.replace("/", "--"))
    download = (f"hf download {name}{' --revision ' + rev if rev else ''} --cache-dir {cache_dir()} "
                "(huggingface-cli download before huggingface_hub 1.0)")
    try:
        snap = _snapshot(root, rev or None)
    except _MissingSnapshot as exc:
        raise MergeConfigError(f"model {ref}: {exc}; an interrupted download? download it again ({download})"
                               f"{exc.hint}") from None
    if snap is None:
        legacy = os.environ.get("TRANSFORMERS_CACHE")  # (huggingface_hub no longer reads it; --transformers-cache does)
        if legacy and _is_dir(_expanded(legacy) / root.name / "snapshots"):
            download = f"{download}, or pass --transformers-cache {legacy} (HF_HUB_CACHE={legacy}), where it is"
        what = f"revision {rev!r} of " if rev else ""
        raise MergeConfigError(f"model {ref}: {what}{name} is not in the Hugging Face cache ({cache_dir()})"
                               f"{' nor a local folder' if not rev else ''}; pymerge works offline: download it "
                               f"first ({download}) or give a local folder")
    return str(snap)


class _MissingSnapshot(Exception):
    """A ref naming a commit whose snapshot folder is not in the cache; hint: the snapshots that are."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def resolve_if_cached(ref: str) -> str:
    """A cached ID's snapshot folder; anything else (local paths, IDs not cached) unchanged."""
    if not looks_like_id(ref):
        return ref
    try:
        return resolve(ref)
    except MergeConfigError:
        return ref  # check_paths reports it, naming the ID


def _snapshot(root: Path, rev: Optional[str]) -> Optional[Path]:
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    ref_file = root / "refs" / (rev or "main")
    if ref_file.is_file():
        commit = _read_ref(ref_file)
        if (snaps / commit).is_dir():
            return snaps / commit
        cached = sorted(p.name for p in snaps.iterdir() if p.is_dir())
        hint = (f"; cached: {', '.join(c[:12] for c in cached[:3])}{', ...' if len(cached) > 3 else ''} "
                f"(give one as {_repo_of(root.name)}@<commit>)") if cached else ""
        raise _MissingSnapshot(f"refs/{rev or 'main'} names commit {commit[:12]}, whose snapshot is not in the cache",
                               hint)
    if rev is not None and _HASH_PREFIX.fullmatch(rev):  # a commit hash, full or a unique prefix of one
        # (not a tag '2' or 'c' that was never downloaded: a commit starting with that letter was merged)
        hits = sorted(p for p in snaps.iterdir() if p.is_dir() and p.name.startswith(rev))
        if len(hits) > 1:
            raise MergeConfigError(f"revision {rev!r} of {_repo_of(root.name)} is "
                                   f"ambiguous: commits {hits[0].name} and {hits[1].name} in the cache "
                                   "start with it; give more of the hash")
        return hits[0] if hits else None
    if rev is not None:
        return None
    only = sorted(p for p in snaps.iterdir() if p.is_dir())
    if len(only) > 1:
        listed = ", ".join(p.name[:12] for p in only[:3]) + (", ..." if len(only) > 3 else "")
        raise MergeConfigError(f"{_repo_of(root.name)} has {len(only)} snapshots in the Hugging Face cache "
                               f"({listed}) and no refs/main to choose one; give the model as org/name@revision")
    named = _refs_naming(root, only[0].name) if only else []
    if named:  # another revision's: `hf download org/m --revision refs/pr/1` merged as org/m, silently (an audit)
        raise MergeConfigError(f"{_repo_of(root.name)} has no refs/main in the Hugging Face cache; its only snapshot "
                               f"is {named[0]}'s (commit {only[0].name[:12]}): give the model as "
                               f"{_repo_of(root.name)}@{named[0]}, or download its main revision")
    return only[0] if only else None


def _refs_naming(root: Path, commit: str) -> list:
    """The refs (branches, tags, refs/pr/N) of a cached repo whose file holds commit, sorted; unreadable ones
    are skipped (the fallback they guard is for a snapshot downloaded by its hash, which no ref names)."""
    refs = root / "refs"
    try:
        paths = sorted(refs.rglob("*")) if _is_dir(refs) else []
    except OSError:  # a refs folder that cannot be listed (another user's cache)
        paths = []
    return [path.relative_to(refs).as_posix() for path in paths if _ref_commit(path) == commit]


def _ref_commit(ref_file: Path) -> Optional[str]:
    """_read_ref's commit, or None where there is no file that can be read as one (is_file raises EACCES too)."""
    try:
        return _read_ref(ref_file) if ref_file.is_file() else None
    except (MergeConfigError, OSError):
        return None


def _read_ref(ref_file: Path) -> str:
    """The commit hash a cache's ref file holds; a file that is not text is a one-line error naming it."""
    from pymerge.io.files import read_small
    data = read_small(ref_file, MergeConfigError, limit=4096)  # a hash and a newline
    try:
        commit = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise MergeConfigError(f"{ref_file}: is not UTF-8 text (byte {exc.start}); a hub cache ref holds "
                               f"a commit hash") from None
    if not _COMMIT.fullmatch(commit):  # ('' named the snapshots folder, '/abs' a folder outside the cache)
        raise MergeConfigError(f"{ref_file}: holds {commit[:60]!r}, not a commit hash; download the model again")
    return commit


def id_of(path: str) -> Optional[str]:
    """`org/name` of a snapshot folder of a hub cache (<cache>/models--org--name/snapshots/<commit>),
    else None: what a model card names instead of the local path (mergekit writes the ID)."""
    p = Path(path)
    return _repo_of(p.parent.parent.name) if p.parent.name == "snapshots" else None


def refs_of(path) -> Optional[Path]:
    """The refs/ folder of the cached repo whose snapshot folder `path` is, else None: resolving `org/name` read
    refs/main there, so it is one of the merge's inputs (an OUT there deleted refs/main; an audit)."""
    p = Path(path)
    return p.parent.parent / "refs" if id_of(str(p)) is not None else None


def pinned_commit(path: str) -> Optional[str]:
    """The commit of a hub cache snapshot folder that is not the one refs/main names (another branch, a tag, a
    PR, a commit given by hash), else None: what tells `org/name@v1` from `org/name` where both are named."""
    p = Path(path)
    if p.parent.name != "snapshots":
        return None
    main = p.parent.parent / "refs" / "main"
    return None if _ref_commit(main) == p.name else p.name


def cached_sides(ref: str) -> list:
    """Each side of a reference (MODEL or MODEL+LORA) as (side, its hub ID or None, pinned_commit or None)."""
    from pymerge.lora import split_ref
    sides = [s for s in split_ref(ref) if s is not None]
    return [(s, repo, pinned_commit(s) if repo else None) for s, repo in ((s, id_of(s)) for s in sides)]


def shown(ref: str) -> str:
    """A model reference as messages name it: a cached snapshot (each side of MODEL+LORA) as its ID, with the
    commit where it is not main's (org/m@<commit>), never the cache's snapshot path; anything else as given."""
    named = [side if repo is None else repo if commit is None else f"{repo}@{commit[:12]}"
             for side, repo, commit in cached_sides(ref)]
    return "+".join(named) if named else ref


def _repo_of(folder: str) -> Optional[str]:
    """`org/name` of a cache's models--org--name folder (resolve's inverse; `name` of a legacy models--name),
    else None."""
    if not folder.startswith("models--") or folder.count("--") not in (1, 2) or folder == "models--":
        return None
    return folder[len("models--"):].replace("--", "/")
