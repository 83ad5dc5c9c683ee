"""GCIDE as plain English prose: the corpus of experiment (h), fetched opt-in, never vendored.

GCIDE, the GNU Collaborative International Dictionary of English (Webster's Revised
Unabridged Dictionary of 1913 plus WordNet 1.5 glosses, GPL-2+), ships in Debian's
``dict-gcide`` package as a dictd database. ``fetch_gcide_deb`` runs ``apt-get download
dict-gcide=0.48.5+nmu2`` into the cache directory (no install, no root needed for the
download itself) and checks the .deb's SHA-256; ``--gcide-deb PATH`` or ``MOEKIT_GCIDE_DEB``
supply the file by hand on a machine without network (the same checksum is required). The
.deb is read with the standard library only (``read_deb_member``: an ``ar`` archive whose
``data.tar.xz`` holds ``usr/share/dictd/gcide.dict.dz``, a dictzip file, i.e. gzip, and
``gcide.index``), so neither ``dpkg`` nor ``dictd`` is needed.

The dictd database is a run of entries whose byte ranges ``gcide.index`` gives (one line per
headword: word, offset and length in dictd's base64). ``gcide_prose`` keeps every entry
except the ``00-database-*`` header (database name, URL, the GNU license banner) and turns
each into plain lines (``clean_entry``; each rule has a test in tests/test_text_experiment.py):
- a per-file banner (``Begin file N of 26`` ... ``Last edit ...``, the license text that
  opens each letter's source file) is dropped; in 0.48.5+nmu2 it occurs only inside the
  header entry;
- source tags that say which edition a paragraph comes from (``[1913 Webster]``,
  ``[WordNet 1.5 +PJC]``, ``[Webster 1913 Suppl.]``, ``[Century Dict. 1906]``, contributor
  initials) are dropped; usage labels such as ``[Obs.]`` or ``[Colloq.]`` are prose and kept;
- the headword's ``\\Pro*nun"ci*a`tion\\`` markup is dropped, with the respelling in
  parentheses that may follow it (``(l[a^]r"[i^]*[a^]t)``);
- cross-reference braces go (``{Lark bunting}`` → ``Lark bunting``);
- GCIDE's ASCII codes for accented letters and ligatures become the plain letters
  (``[=a]`` → ``a``, ``[a^]`` → ``a``, ``[ae]`` → ``ae``); rarer codes (``[root]``, ``[eth]``) stay;
- layout: each blank-line-separated paragraph becomes one line (its hard-wrapped lines joined,
  runs of spaces collapsed), and entries are separated by one empty line.
Three bytes of the 0.48.5+nmu2 database are not UTF-8 (cp1252 quotes); they are decoded as
cp1252 and counted (``PreparedGcide.non_utf8_bytes``).

The prepared text keeps dictionary order (``0``, ``1`` ... ``Zythepsary``), so the trainer's
last-10% validation split is the end of the alphabet: held-out entries whose headwords the
model never trained on. It is cached as ``<cache>/gcide-prose-v1.txt`` with its SHA-256 (and
the .deb's) in ``gcide-prose-v1.txt.sha256``; a cached file whose hash does not match is
prepared again from the .deb.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moekit.experiments.datasets import default_cache_dir, file_digest

GCIDE_PACKAGE = "dict-gcide"
GCIDE_VERSION = "0.48.5+nmu2"
GCIDE_DEB = f"{GCIDE_PACKAGE}_{GCIDE_VERSION}_all.deb"
GCIDE_DEB_BYTES = 14_800_692
GCIDE_DEB_SHA256 = "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"
GCIDE_DEB_ENV = "MOEKIT_GCIDE_DEB"  # path of the .deb, supplied by hand
DICT_MEMBER = "usr/share/dictd/gcide.dict.dz"
INDEX_MEMBER = "usr/share/dictd/gcide.index"
# NOTE: bump the version when a stripping rule changes, so that a cached text is not reused.
PREPARED_NAME = "gcide-prose-v1.txt"
HEADER_PREFIX = "00-database-"
DOWNLOAD_TIMEOUT_S = 600

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_BYTES = 60


class GcideUnavailable(RuntimeError):
    """The .deb could not be fetched (no apt-get, no network); the message says how to supply it."""


def _by_hand(cache: Path) -> str:
    return (
        f"Supply the package by hand: on a machine with network run `apt-get download {GCIDE_PACKAGE}="
        f"{GCIDE_VERSION}` (or fetch {GCIDE_DEB} from a Debian mirror, pool/main/d/{GCIDE_PACKAGE}/; "
        f"{GCIDE_DEB_BYTES:,} bytes, sha256 {GCIDE_DEB_SHA256}), then pass --gcide-deb PATH, set "
        f"{GCIDE_DEB_ENV}=PATH, or put it in {cache}"
    )


def given_deb(deb: Path | None) -> tuple[Path, str] | None:
    """The .deb supplied by hand and where it came from: ``deb`` (--gcide-deb), else $MOEKIT_GCIDE_DEB."""
    if deb is not None:
        return deb, f"--gcide-deb {deb}"
    if os.environ.get(GCIDE_DEB_ENV):
        return Path(os.environ[GCIDE_DEB_ENV]), f"{GCIDE_DEB_ENV}={os.environ[GCIDE_DEB_ENV]}"
    return None


def verify_deb(path: Path, expected_sha256: str | None = None, source: str | None = None) -> None:
    """Raise ValueError unless ``path`` is a file with the expected SHA-256 (default: GCIDE_DEB_SHA256);
    ``source`` names where the path came from (the flag or variable the user set)."""
    expected_sha256 = expected_sha256 or GCIDE_DEB_SHA256
    if not path.is_file():
        raise ValueError(f"{source or path}: no such file")
    actual = file_digest(path, "sha256")
    if actual != expected_sha256:
        raise ValueError(
            f"{source or path}: sha256 {actual} is not that of {GCIDE_DEB} ({expected_sha256}); "
            f"it is another file or another version of {GCIDE_PACKAGE}, and is not used"
        )


def fetch_gcide_deb(cache: Path, deb: Path | None = None, expected_sha256: str | None = None) -> Path:
    """The checked .deb: ``deb`` (else ``$MOEKIT_GCIDE_DEB``) when given, else the one in
    ``cache``, else downloaded into ``cache`` with ``apt-get download``. Raises
    ``GcideUnavailable`` when the download fails and ValueError when a checksum differs."""
    given = given_deb(deb)
    if given is not None:
        verify_deb(given[0], expected_sha256, given[1])
        return given[0]
    cached = cache / GCIDE_DEB
    if not cached.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = ["apt-get", "download", f"{GCIDE_PACKAGE}={GCIDE_VERSION}"]
        shown = " ".join(command)
        try:
            done = subprocess.run(command, cwd=cache, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except FileNotFoundError as err:
            raise GcideUnavailable(f"`{shown}` could not run: apt-get is not installed ({err}). {_by_hand(cache)}") \
                from err
        except (OSError, subprocess.TimeoutExpired) as err:
            raise GcideUnavailable(f"`{shown}` could not run: {err}. {_by_hand(cache)}") from err
        if done.returncode != 0 or not cached.exists():
            tail = " / ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:]) or "no output"
            raise GcideUnavailable(
                f"`{shown}` (in {cache}) exited with status {done.returncode} without {GCIDE_DEB}: {tail}. "
                f"{_by_hand(cache)}"
            )
    verify_deb(cached, expected_sha256)
    return cached


def read_ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a .deb is one): name → bytes."""
    if not data.startswith(_AR_MAGIC):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, position = {}, len(_AR_MAGIC)
    while position + _AR_HEADER_BYTES <= len(data):
        header = data[position : position + _AR_HEADER_BYTES]
        if header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar member header at byte {position}")
        name = header[:16].decode("ascii").rstrip().rstrip("/")  # GNU ar ends names with '/'
        size = int(header[48:58].decode("ascii").strip())
        start = position + _AR_HEADER_BYTES
        if start + size > len(data):
            raise ValueError(f"ar member {name!r} runs past the end of the archive")
        members[name] = data[start : start + size]
        position = start + size + (size % 2)  # members are padded to an even offset
    return members


def read_deb_member(deb: Path, member: str) -> bytes:
    """One file of a .deb's data archive (``data.tar.xz``, ``.gz``, ``.bz2`` or plain ``.tar``)."""
    members = read_ar_members(deb.read_bytes())
    data_names = [name for name in members if name.startswith("data.tar")]
    if not data_names:
        raise ValueError(f"{deb}: no data.tar member (members: {', '.join(members) or 'none'})")
    if data_names[0] not in ("data.tar", "data.tar.xz", "data.tar.gz", "data.tar.bz2"):
        raise ValueError(f"{deb}: {data_names[0]} is a compression the standard library cannot read")
    with tarfile.open(fileobj=io.BytesIO(members[data_names[0]]), mode="r:*") as archive:
        for info in archive.getmembers():
            if info.name.removeprefix("./") == member and info.isfile():
                handle = archive.extractfile(info)
                assert handle is not None  # a regular file always has contents
                return handle.read()
    raise ValueError(f"{deb}: its {data_names[0]} has no {member}")


# --------------------------------------------------------------------------------------------
# The dictd database → entries
# --------------------------------------------------------------------------------------------


def decode_dictd_number(text: str) -> int:
    """dictd's index numbers: base 64 (A-Z a-z 0-9 + /), most significant digit first
    (``"5I"`` = 57·64 + 8 = 3656)."""
    value = 0
    for char in text:
        digit = _DICTD_B64.find(char)
        if digit < 0:
            raise ValueError(f"{text!r} is not a dictd base-64 number")
        value = value * 64 + digit
    return value


def decode_text(raw: bytes) -> tuple[str, int]:
    """UTF-8, with any byte that is not valid UTF-8 read as cp1252; returns (text, such bytes)."""
    parts, start, fallback = [], 0, 0
    while True:
        try:
            parts.append(raw[start:].decode("utf-8"))
            return "".join(parts), fallback
        except UnicodeDecodeError as err:
            bad = raw[start + err.start : start + err.end]
            parts += [raw[start : start + err.start].decode("utf-8"), bad.decode("cp1252", errors="replace")]
            fallback += len(bad)
            start += err.end


@dataclass(frozen=True)
class DictEntry:
    headwords: tuple[str, ...]  # every index line that points to this entry
    text: str


def read_dictd(dict_bytes: bytes, index_text: str) -> tuple[list[DictEntry], int]:
    """The entries of a dictd database in file order, and the count of non-UTF-8 bytes.

    Several headwords may point to one entry (``1-dodecanol`` and ``C12H25OH``): it is kept once.
    """
    ranges: dict[tuple[int, int], list[str]] = {}
    for line_no, line in enumerate(index_text.splitlines(), start=1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"gcide.index line {line_no}: expected 3 tab-separated fields, got {len(fields)}")
        word, offset, length = fields
        ranges.setdefault((decode_dictd_number(offset), decode_dictd_number(length)), []).append(word)
    entries, fallback, end = [], 0, 0
    for offset, length in sorted(ranges):
        if offset < end or offset + length > len(dict_bytes):
            raise ValueError(f"gcide.index: entry {ranges[offset, length][0]!r} at bytes {offset}+{length} "
                             f"overlaps another or runs past the database ({len(dict_bytes)} bytes)")
        text, bad = decode_text(dict_bytes[offset : offset + length])
        entries.append(DictEntry(tuple(ranges[offset, length]), text))
        fallback += bad
        end = offset + length
    return entries, fallback


# --------------------------------------------------------------------------------------------
# Stripping rules (the module docstring lists them)
# --------------------------------------------------------------------------------------------

_BANNER_START = re.compile(r"^\s*Begin file \d+ of \d+:", re.MULTILINE)
_BANNER_END = re.compile(r"^\s*Last edit\b.*$", re.MULTILINE)
# One source: an edition (1913 Webster, its 1913 supplement, WordNet 1.5/1.6 or "WordNet sense 2",
# Century Dictionary 1906, PJC: the GCIDE editor) or a contributor's initials or a reference
# work's abbreviation (AS, RDH, RHUD, MW10).
_EDITION = (
    r"(?:1913\s+Webster|Webster\s+1913\s+Suppl\.|WordNet\s+\d\.\d|WordNet\s+sense\s+\d+(?:\s*[+&,]\s*\d+)*"
    r"|Century\s+Dict(?:ionary|\.)?,?\s+1906\.?|PJC\.?)"
)
_SOURCE = rf"(?:{_EDITION}|[A-Z]{{2,4}}\d{{0,2}})"
_SOURCE_TAG = re.compile(rf"\[\s*\+?\s*{_SOURCE}(?:\s*\+?\s*{_SOURCE})*\s*\]")
# A few tags lack their closing bracket: an edition's tag that runs to the end of its line.
_UNCLOSED_SOURCE_TAG = re.compile(rf"[ \t]*\[\s*{_EDITION}[^\[\]\n]*$", re.MULTILINE)
# \Lar"i*at\ (it may wrap onto the next line) and the respelling in parentheses right after it,
# when that holds respelling marks.
_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\]{1,80}\\(?:\s*\([^()]{0,80}[\[\]\"*`'][^()]{0,80}\))?")
_MARKED_LETTER = re.compile(r"\[[=\-~^'`\".,*]([A-Za-z]{1,2})\]")  # [=a] [~n] ['e] [,c] [=oo]
_LETTER_MARKED = re.compile(r"\[([A-Za-z]{1,2})(?:\^|um|mac)\]")  # [a^] [aum] [imac] [oo^]
_LIGATURE = re.compile(r"\[(ae|oe|AE|OE)\]")
_SPACES = re.compile(r"[ \t]+")


def strip_banner(text: str) -> str:
    """Drop every ``Begin file N of M:`` ... ``Last edit ...`` license banner."""
    while (start := _BANNER_START.search(text)) is not None:
        end = _BANNER_END.search(text, start.end())
        if end is None:
            # NOTE: a banner of unknown shape: stop rather than keep license text or drop prose.
            raise ValueError(f"a GCIDE file banner without its 'Last edit' line: {text[start.start():][:120]!r}")
        text = text[: start.start()] + text[end.end() :]
    return text


def strip_source_tags(text: str) -> str:
    return _UNCLOSED_SOURCE_TAG.sub("", _SOURCE_TAG.sub("", text))


def strip_pronunciation(text: str) -> str:
    return _PRONUNCIATION.sub("", text)


def strip_braces(text: str) -> str:
    return text.replace("{", "").replace("}", "")


def plain_letters(text: str) -> str:
    text = _MARKED_LETTER.sub(r"\1", text)
    text = _LETTER_MARKED.sub(r"\1", text)
    return _LIGATURE.sub(r"\1", text)


def paragraphs_as_lines(text: str) -> list[str]:
    """Each blank-line-separated paragraph as one line: wrapped lines joined, spaces collapsed."""
    lines = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        line = _SPACES.sub(" ", " ".join(part.strip() for part in paragraph.splitlines())).strip()
        if line:
            lines.append(line)
    return lines


def clean_entry(text: str) -> list[str]:
    """One dictionary entry as plain prose lines (the rules in the module docstring, in order)."""
    text = strip_banner(text)
    text = strip_source_tags(text)
    text = strip_pronunciation(text)
    text = strip_braces(text)
    text = plain_letters(text)
    return paragraphs_as_lines(text)


def gcide_prose(entries: list[DictEntry]) -> str:
    """The prose of every entry but the ``00-database-*`` header, one empty line between entries."""
    blocks = []
    for entry in entries:
        if any(word.startswith(HEADER_PREFIX) for word in entry.headwords):
            continue
        lines = clean_entry(entry.text)
        if lines:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# --------------------------------------------------------------------------------------------
# The prepared corpus, cached
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedGcide:
    path: Path
    sha256: str  # of the prepared text: the identity every run's spec records
    num_bytes: int
    deb: Path | None  # the .deb it was prepared from now (None: reused from the cache)
    entries: int | None = None
    non_utf8_bytes: int | None = None


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def prepare_gcide(
    cache_dir: Path | None = None, deb: Path | None = None, expected_sha256: str | None = None
) -> PreparedGcide:
    """The prepared prose in ``cache_dir`` (default ~/.cache/moekit/gcide), made on first use.

    A .deb given (``deb`` or ``$MOEKIT_GCIDE_DEB``) is always checked. The cached text is reused
    when its SHA-256 matches the one stored beside it and it was prepared from a .deb of the
    expected SHA-256; otherwise the .deb (``fetch_gcide_deb``) is read and stripped."""
    expected_sha256 = expected_sha256 or GCIDE_DEB_SHA256
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("gcide")
    given = given_deb(deb)
    if given is not None:
        verify_deb(given[0], expected_sha256, given[1])
    path, digest_path = cache / PREPARED_NAME, cache / (PREPARED_NAME + ".sha256")
    if path.exists() and digest_path.exists():
        # "<text sha256>  gcide-prose-v1.txt" then "<.deb sha256>  <.deb name>"
        stored = [line.split()[0] for line in digest_path.read_text().splitlines() if line.strip()]
        if len(stored) == 2 and stored[1] == expected_sha256 and file_digest(path, "sha256") == stored[0]:
            return PreparedGcide(path, stored[0], path.stat().st_size, None)
    source = fetch_gcide_deb(cache, deb, expected_sha256)
    dict_bytes = gzip.decompress(read_deb_member(source, DICT_MEMBER))  # dictzip is gzip
    index_text = read_deb_member(source, INDEX_MEMBER).decode("utf-8")
    entries, fallback = read_dictd(dict_bytes, index_text)
    data = gcide_prose(entries).encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    _write_atomic(digest_path, f"{digest}  {PREPARED_NAME}\n{expected_sha256}  {source.name}\n".encode())
    return PreparedGcide(path, digest, len(data), source, len(entries), fallback)
