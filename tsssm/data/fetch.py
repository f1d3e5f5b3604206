"""`tsssm data fetch skab|ett`: the benchmark datasets from their upstream repositories.

Files come from pinned commits (so the bytes never change), are checked against their SHA-256 and
land in a cache folder that the dataset configs' ``data.root`` defaults to:
``$TSSSM_DATA`` if set, else ``$XDG_CACHE_HOME/tsssm/datasets`` (``~/.cache/tsssm/datasets``), one
sub-folder per dataset. Each file is written to a temporary name and renamed once its checksum
matches, so an interrupted or corrupted download never looks like data. Offline, the error names
every URL to fetch by hand and where to put it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tsssm.errors import DataError


@dataclass(frozen=True)
class Source:
    """One dataset: where its files live upstream, and their checksums."""

    name: str
    base_url: str  # + relative path = the file's URL
    files: dict[str, str]  # relative path -> SHA-256
    license: str
    cite: str


#: SHA-256 of every file at the pinned commits (relative path -> digest)
_SKAB_FILES = {
    "data/anomaly-free/anomaly-free.csv":
        "7641a8742957100ef424dd97adfb3eeab27d4d180645fe2b3c49b7f7146ae9a6",
    "data/other/1.csv": "3beaf861bdfe9b4f4eff8e7567c1dd3f506fbd0ce667fc9399d04bd2dc70623d",
    "data/other/2.csv": "951c326bf36366fa7615b8f28d22f80b3878036069a690f42b3e223737a6a8d1",
    "data/other/3.csv": "f3c19a89f74f62a475c246b9263f161f7a734dd88304de803939cebaa55c7ebd",
    "data/other/4.csv": "56ca23f4eb61d1347d079eb9a35c60a59b8b64e160c00dd0c2ec69e0df0b2a4b",
    "data/other/5.csv": "7347b326df3a92c0810c69add0e5621939af7a1c1cb4755081d088e72d36920f",
    "data/other/6.csv": "eb8f05622a62c855040ea358b87be35fb1a4a3720ba0610569bab384db4b6e04",
    "data/other/7.csv": "1bee14f49bfc817ba2c335fb427baa71153d8f8ab52e72652f15f74e4b77daec",
    "data/other/8.csv": "12c138ed99c198e0a7ece886fe01bfd16bbdde206fad6c5d74322b6b9d6488d0",
    "data/other/9.csv": "11c4514b0bc706acff637fea6707ad9258ac878fe9dff3d0b11d2b618d94d8ea",
    "data/other/10.csv": "72683644f6f17689f619076a66a9ec02cbc0502bd669924c4c33951d1bdad9b0",
    "data/other/11.csv": "98a2fff3b6516205ae2e12f2dd30d7f08465fe4321a1bd5cf823396985ecb37b",
    "data/other/12.csv": "b0882efbcf2669223ae78bee61c9f10074a9b2375f0e86b8957ae5ce4aad1e72",
    "data/other/13.csv": "b3f1da02064d11234836a9fa1a2536bb0d3b6c6998ab60b0b71869b98e94d860",
    "data/other/14.csv": "c7f361e55397cc9efd4a76b6876111eda79b650d10aeb007342ca5972152eaef",
    "data/valve1/0.csv": "16af3f71313a23dd33d9b7b8065d836d05c3f9257588881cc7fbe07c076d9dc8",
    "data/valve1/1.csv": "fe4493bf805baef4e6dfb864094275d8cc2ea80a16b3735e2752b18b6aefd812",
    "data/valve1/2.csv": "90492413469261886c8896c327241448df5da73fd7739cabfec8dd82de3c0ce4",
    "data/valve1/3.csv": "cb6afea108eddfd8447307e405f86bbb764b8d8e9130d7849a46e1303e19b8b2",
    "data/valve1/4.csv": "983aed9dc09991a57911091373c580e1b86d06aa983cd51678f108fd8d709654",
    "data/valve1/5.csv": "78974991ec87b7f9b9b6b2944f4b525468a9beb36c59b06cd7650d9a15eca14a",
    "data/valve1/6.csv": "97469c0e0c9c0e0ee5d30794f1f36c6785df5816a112a8b16c59637e8c894685",
    "data/valve1/7.csv": "ca2c9c6d6fa302c642acec6fbedac495bd12fececeee0a755d45a54e340e0f30",
    "data/valve1/8.csv": "0c4afb92248b5b35b4c9d734a91ed8318346901f04579074903730569e60416c",
    "data/valve1/9.csv": "2aa1ae1b2ff505caecda24802b877dc686924bbbeeb7e7db4faa261efb5ed5bd",
    "data/valve1/10.csv": "ee16be8e4b870c779491e3d1dc9e0ecbfaf29eb013e032abff7a33f2cbbfe2ad",
    "data/valve1/11.csv": "89660fae4ed5c918db014409bbbc29f498fd99c7e956fab2620d18dea700a973",
    "data/valve1/12.csv": "90adfa9bc86d4556e6a4ce734436fd5685af79c189cd9828f8df75a7f468ce07",
    "data/valve1/13.csv": "d6cb6a97437215d3066a87e1fcc5fa4e68017629c043c5315920e3cf1060841c",
    "data/valve1/14.csv": "5f0bb9bc33c5e6c259263e32e25915c4d24c82b0a94554d48808626da05c1d71",
    "data/valve1/15.csv": "75cc86ab25d7091eee024739fa06d048753480d5d7d1507077231cab4f1b7a7e",
    "data/valve2/0.csv": "a6670e7a68c7c6ba62c649bd9d350633e80db624578e9529f2b736ced5e32bde",
    "data/valve2/1.csv": "b35d27f664eb0851ab73e5eb06633404c7eeaf532edff7e40c68eb9379f2012b",
    "data/valve2/2.csv": "2c3005cf28b88db715b7f4694e826ff252cba4dbb1eba679b040961f80477e60",
    "data/valve2/3.csv": "86927555d5c523e587d41500bd5dee4e2468289ec1b988ac17755aeae697d7f8",
}
_ETT_FILES = {
    "ETTh1.csv": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    "ETTh2.csv": "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b",
    "ETTm1.csv": "6ce1759b1a18e3328421d5d75fadcb316c449fcd7cec32820c8dafda71986c9e",
    "ETTm2.csv": "db973ca252c6410a30d0469b13d696cf919648d0f3fd588c60f03fdbdbadd1fd",
}

SOURCES: dict[str, Source] = {
    "skab": Source(
        name="skab",
        base_url="https://raw.githubusercontent.com/waico/SKAB/"
                 "b2c0d46c2971dcbfe71e26087b6d231998bb91c2/",
        files=_SKAB_FILES,
        license="GNU GPL v3.0 (https://github.com/waico/SKAB/blob/master/LICENSE)",
        cite="Katser & Kozitsin, Skoltech Anomaly Benchmark (SKAB), Kaggle, 2020",
    ),
    "ett": Source(
        name="ett",
        base_url="https://raw.githubusercontent.com/zhouhaoyi/ETDataset/"
                 "1d16c8f4f943005d613b5bc962e9eeb06058cf07/ETT-small/",
        files=_ETT_FILES,
        license="CC BY-ND 4.0 (https://github.com/zhouhaoyi/ETDataset)",
        cite="Zhou et al., Informer, AAAI 2021",
    ),
}


def data_home() -> Path:
    """The cache folder that holds fetched datasets (one sub-folder each)."""
    if os.environ.get("TSSSM_DATA"):
        return Path(os.environ["TSSSM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tsssm" / "datasets"


def default_root(name: str) -> str:
    """``data.root``'s default for a dataset: its folder in the cache (see ``data_home``)."""
    return str(data_home() / name)


def source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(SOURCES)}")
    return SOURCES[name]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_files(name: str, root: str | Path | None = None) -> list[str]:
    """Relative paths of the dataset's files that are absent (or wrong) under ``root``."""
    src = source(name)
    folder = Path(root) if root else Path(default_root(name))
    return [rel for rel, digest in src.files.items()
            if not (folder / rel).is_file() or sha256(folder / rel) != digest]


def fetch(name: str, to: str | Path | None = None, *, mirror: str | None = None,
          files: Iterable[str] | None = None,
          progress: Callable[[str], None] | None = None) -> Path:
    """Download a dataset's files (those not already present and intact) into ``to`` (default
    the cache) and verify them. ``mirror``: a base URL to use instead of upstream (e.g. a
    ``file://`` folder laid out like the upstream one; also ``$TSSSM_DATA_MIRROR``).
    Returns the dataset folder. Raises DataError naming the URL and what to do."""
    src = source(name)
    folder = Path(to).expanduser() if to else Path(default_root(name))
    base = mirror or os.environ.get("TSSSM_DATA_MIRROR") or src.base_url
    base = base if base.endswith("/") else base + "/"
    wanted = list(files) if files is not None else list(src.files)
    unknown = [f for f in wanted if f not in src.files]
    if unknown:
        raise DataError(f"{name} has no file {unknown[0]!r}")
    todo = [rel for rel in wanted
            if not (folder / rel).is_file() or sha256(folder / rel) != src.files[rel]]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {folder} ({err.strerror}); choose another folder "
                        "with --to DIR (or set TSSSM_DATA)") from err
    for i, rel in enumerate(todo):
        url = base + rel
        if progress:
            progress(f"[{i + 1}/{len(todo)}] {url}")
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            got = sha256(tmp)
            if got != src.files[rel]:
                raise DataError(f"{url}: checksum mismatch (sha256 {got[:12]}..., expected "
                                f"{src.files[rel][:12]}...); the download is corrupt or the "
                                "mirror holds other bytes; nothing was kept, try again")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
            left = "\n".join(f"  {base + r}  ->  {folder / r}" for r in todo[i:])
            raise DataError(
                f"cannot download {url} ({reason}); fetch these {len(todo) - i} files by hand "
                f"and put them at the paths shown, then run the command again:\n{left}"
            ) from err
        finally:
            tmp.unlink(missing_ok=True)
    return folder
