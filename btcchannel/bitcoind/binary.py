"""Finding or fetching a usable ``bitcoind``.

:func:`find_bitcoind` returns a :class:`BitcoindBinary`: ``$BITCOIND``, else one
on ``PATH`` (Bitcoin Core >= 25 or Bitcoin Knots), else Debian's
``bitcoin-knots`` package, fetched by :func:`fetch_bitcoind` through this
machine's own apt sources into the user's cache folder (:func:`cache_dir`) and
run through its own dynamic loader (so it works on a host with an older glibc).
Fetching is idempotent, file-locked and safe to interrupt, and says what it does as it goes
(a :data:`Progress` callback; by default one line per step on stderr), as it takes a minute or
more on a first run.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from btcchannel.errors import BitcoindNotFound

__all__ = [
    "ARCHIVE_KEYRING",
    "INSTALL_HINT",
    "KNOTS_PACKAGE",
    "KNOTS_ROOTS",
    "MIN_CORE_MAJOR",
    "BitcoindBinary",
    "Progress",
    "stderr_progress",
    "cache_dir",
    "debian_archive_uri",
    "fetch_bitcoind",
    "find_bitcoind",
]

MIN_CORE_MAJOR = 25
INSTALL_HINT = (
    "install Bitcoin Core 25 or newer (https://bitcoincore.org/en/download/) and put "
    "bitcoind on PATH or set BITCOIND=/path/to/bitcoind, or let btcchannel fetch "
    "Debian's bitcoin-knots package (needs apt-get and dpkg on a Debian or Ubuntu host)"
)
# Runtime of Debian's bitcoin-knots: these packages and the libraries they need.
KNOTS_PACKAGE = "bitcoin-knots"
KNOTS_ROOTS = (
    KNOTS_PACKAGE,
    "libc6",
    "libstdc++6",
    "libgcc-s1",
    "libsqlite3-0",
    "libzmq5",
    "libevent-core-2.1-7t64",
    "libevent-extra-2.1-7t64",
    "libevent-pthreads-2.1-7t64",
)
# Dependencies that are not shared libraries and are never needed to run bitcoind.
_NOT_RUNTIME = re.compile(
    r"^(debconf.*|cdebconf|systemd.*|opensysusers|adduser|init-system-helpers|"
    r"passwd|base-files|dpkg|perl.*|sensible-utils|lsb-base|tzdata|.*-common|.*-data)$"
)
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_LIB_DIR = "usr/lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class BitcoindBinary:
    """How to run bitcoind and bitcoin-cli (a command prefix, maybe via a loader)."""

    bitcoind: tuple[str, ...]
    bitcoin_cli: tuple[str, ...]
    version: str
    source: str  # "env", "path" or "cache"


Progress = Callable[[str], None]
"""Hears one line per step of a fetch (``"fetching bitcoind: ..."``)."""


def stderr_progress(line: str) -> None:
    """The default :data:`Progress`: the line on stderr, at once."""
    print(line, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/btcchannel`` (default ``~/.cache/btcchannel``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "btcchannel"


def _version_of(cmd: tuple[str, ...]) -> str | None:
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or "").strip().splitlines()
    return first[0] if out.returncode == 0 and first else None


def _acceptable(version: str) -> bool:
    if "Knots" in version:
        return True
    m = re.search(r"Bitcoin Core.*?v(\d+)\.", version)
    return m is not None and int(m.group(1)) >= MIN_CORE_MAJOR


def _sibling_cli(bitcoind: str) -> str:
    cli = Path(bitcoind).with_name("bitcoin-cli")
    return str(cli) if cli.exists() else (shutil.which("bitcoin-cli") or "bitcoin-cli")


def find_bitcoind(fetch: bool = True, progress: Progress | None = None) -> BitcoindBinary:
    """A usable bitcoind: ``$BITCOIND``, then ``PATH``, then the cache (fetching if needed, its
    steps told to ``progress``, stderr by default)."""
    env = os.environ.get("BITCOIND")
    if env:
        version = _version_of((env,))
        if version is None or not _acceptable(version):
            raise BitcoindNotFound(
                f"BITCOIND={env} is not Bitcoin Core >= {MIN_CORE_MAJOR} or Bitcoin Knots "
                f"({version or 'it did not run'}); {INSTALL_HINT}"
            )
        return BitcoindBinary((env,), (_sibling_cli(env),), version, "env")
    on_path = shutil.which("bitcoind")
    if on_path:
        version = _version_of((on_path,))
        if version is not None and _acceptable(version):
            return BitcoindBinary((on_path,), (_sibling_cli(on_path),), version, "path")
    cached = _cached_binary(cache_dir() / "knots")
    if cached is not None:
        return cached
    if not fetch:
        raise BitcoindNotFound(f"no bitcoind found; {INSTALL_HINT}")
    return fetch_bitcoind(progress=progress)


def _loader_prefix(root: Path, program: str) -> tuple[str, ...]:
    lib = root / _LIB_DIR
    return (str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib), str(root / "usr/bin" / program))


def _cached_binary(root: Path) -> BitcoindBinary | None:
    marker = root / ".complete"
    if not marker.exists():
        return None
    prefix = _loader_prefix(root, "bitcoind")
    version = _version_of(prefix)
    if version is None:
        return None
    return BitcoindBinary(prefix, _loader_prefix(root, "bitcoin-cli"), version, "cache")


def _apt_value(name: str) -> str:
    out = subprocess.run(["apt-config", "shell", "V", name], capture_output=True, text=True, check=False)
    m = re.match(r"V='(.*)'", out.stdout.strip())
    return m.group(1) if m else ""


def debian_archive_uri() -> str:
    """The Debian archive URI this machine's own apt configuration uses."""
    candidates: list[str] = []
    for path in _apt_source_files():
        try:
            text = path.read_text()
        except OSError:
            continue
        candidates.extend(_deb822_uris(text) if path.suffix == ".sources" else _one_line_uris(text))
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian") or "debian" in uri:
            return uri.rstrip("/")
    raise BitcoindNotFound(f"no Debian archive in this machine's apt sources; {INSTALL_HINT}")


def _apt_source_files() -> list[Path]:
    """The source lists apt reads here: its main list, then the ``.list`` and ``.sources`` files of
    its parts directory (as ``Dir::Etc::sourcelist`` and ``Dir::Etc::sourceparts`` name them)."""
    etc = Path("/etc/apt")
    sourcelist = _apt_value("Dir::Etc::sourcelist") or "sources.list"
    parts = _apt_value("Dir::Etc::sourceparts") or "sources.list.d"
    main_list = Path(sourcelist) if sourcelist.startswith("/") else etc / sourcelist
    parts_dir = Path(parts) if parts.startswith("/") else etc / parts
    files: list[Path] = []
    if main_list.exists():
        files.append(main_list)
    if parts_dir.is_dir():
        files.extend(sorted(p for p in parts_dir.iterdir() if p.suffix in (".list", ".sources")))
    return files


def _one_line_uris(text: str) -> list[str]:
    """The archive URIs of a one-line-style list (``deb [options] URI suite ...``), security ones left out."""
    uris: list[str] = []
    for line in text.splitlines():
        m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m and "security" not in m.group(1) and "security" not in m.group(2):
            uris.append(m.group(1))
    return uris


def _deb822_uris(text: str) -> list[str]:
    """The archive URIs of a deb822-style ``.sources`` file: those of its enabled ``deb`` stanzas,
    security ones left out."""
    uris: list[str] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = _deb822_fields(stanza)
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        suites = fields.get("suites", "")
        uris.extend(uri for uri in fields.get("uris", "").split() if "security" not in suites and "security" not in uri)
    return uris


def _deb822_fields(stanza: str) -> dict[str, str]:
    """A deb822 stanza's fields by lowercase name (comments and continuation lines skipped)."""
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.lstrip().startswith("#") and not line[:1].isspace():
            fields[key.strip().lower()] = value.strip()
    return fields


def _apt_options(work: Path) -> list[str]:
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=False).stdout.strip()
    return [
        "-o",
        f"Dir::Etc::sourcelist={work / 'btcchannel.sources'}",
        "-o",
        "Dir::Etc::sourceparts=/dev/null",
        "-o",
        f"Dir::State::Lists={work / 'lists'}",
        "-o",
        "Dir::State::status=/dev/null",
        "-o",
        f"Dir::Cache={work / 'cache'}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        f"APT::Sandbox::User={user or 'root'}",
        "-q",
    ]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False, timeout=900)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise BitcoindNotFound(f"{cmd[0]} failed: {' | '.join(tail)}; {INSTALL_HINT}")
    return out.stdout


def _runtime_closure(apt: list[str]) -> list[str]:
    """The packages bitcoind needs at run time: the roots plus their library dependencies."""
    seen: set[str] = set()
    todo = list(KNOTS_ROOTS)
    while todo:
        batch = [p for p in dict.fromkeys(todo) if p not in seen]
        todo = []
        if not batch:
            break
        seen.update(batch)
        out = _run(
            [
                "apt-cache",
                *apt,
                "depends",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
                *batch,
            ]
        )
        for line in out.splitlines():
            m = re.match(r"\s*\|?(?:Pre)?Depends:\s+(\S+)", line)
            if not m or m.group(1).startswith("<"):
                continue
            dep = m.group(1).split(":")[0]
            if dep not in seen and not _NOT_RUNTIME.match(dep) and dep.startswith("lib"):
                todo.append(dep)
    return sorted(seen)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_bitcoind(cache: Path | None = None, progress: Progress | None = None) -> BitcoindBinary:
    """Fetch Debian unstable's bitcoin-knots and its runtime libraries into the cache.

    Idempotent and safe to interrupt: everything is unpacked into a staging
    folder that is renamed into place only once bitcoind has run from it.
    ``progress`` hears each step (stderr by default), including a wait for another
    process that is fetching into the same cache.
    """
    say = progress or stderr_progress
    base = cache or cache_dir()
    root = base / "knots"
    if _cached_binary(root) is None:
        say(
            f"fetching bitcoind: no bitcoind on PATH or in $BITCOIND; getting Debian's {KNOTS_PACKAGE} into "
            f"{root} (once, about a minute)"
        )
    with _file_lock(base / "knots.lock"):
        cached = _cached_binary(root)
        if cached is not None:
            return cached
        for tool in ("apt-get", "apt-cache", "apt-config", "dpkg"):
            if shutil.which(tool) is None:
                raise BitcoindNotFound(f"no bitcoind found and {tool} is missing; {INSTALL_HINT}")
        if not ARCHIVE_KEYRING.exists():
            raise BitcoindNotFound(f"no bitcoind found and no {ARCHIVE_KEYRING}; {INSTALL_HINT}")
        uri = debian_archive_uri()
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="knots-", dir=base) as tmp:
            work = Path(tmp)
            for sub in ("lists/partial", "cache/archives/partial", "debs", "root"):
                (work / sub).mkdir(parents=True)
            (work / "btcchannel.sources").write_text(
                f"Types: deb\nURIs: {uri}\nSuites: unstable\nComponents: main\nSigned-By: {ARCHIVE_KEYRING}\n"
            )
            apt = _apt_options(work)
            say(f"fetching bitcoind: reading the package lists of {uri} (unstable)")
            _run(["apt-get", *apt, "update"])
            packages = _runtime_closure(apt)
            say(f"fetching bitcoind: downloading {len(packages)} packages")
            _run(["apt-get", *apt, "download", *packages], cwd=work / "debs")
            say("fetching bitcoind: unpacking")
            for deb in sorted((work / "debs").glob("*.deb")):
                _run(["dpkg", "-x", str(deb), str(work / "root")])
            staged = work / "root"
            version = _version_of(_loader_prefix(staged, "bitcoind"))
            if version is None:
                raise BitcoindNotFound(f"the fetched bitcoind does not run; {INSTALL_HINT}")
            (staged / ".complete").write_text(version + "\n")
            if root.exists():
                shutil.rmtree(root)
            staged.rename(root)
        found = _cached_binary(root)
        if found is None:
            raise BitcoindNotFound(f"the fetched bitcoind does not run; {INSTALL_HINT}")
        say(f"fetching bitcoind: done, {found.version}")
        return found
