"""`tsssm data fetch`: pinned files verified by checksum, from a local file:// mirror (the
bundled SKAB sample files are byte-identical to upstream's), atomic, offline advice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tsssm.cli import main
from tsssm.data.fetch import SOURCES, fetch, missing_files
from tsssm.errors import DataError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "skab"
FILES = ["data/valve1/0.csv", "data/valve1/1.csv", "data/valve2/0.csv",
         "data/anomaly-free/anomaly-free.csv"]


@pytest.fixture()
def mirror(tmp_path) -> Path:
    """A folder laid out like SKAB's repository, holding the bundled sample's files."""
    root = tmp_path / "mirror"
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / rel.removeprefix("data/"), root / rel)
    return root


def test_fetch_verifies_and_skips_what_is_there(tmp_path, mirror):
    lines: list[str] = []
    folder = fetch("skab", tmp_path / "skab", mirror=mirror.as_uri(), files=FILES,
                   progress=lines.append)
    assert all((folder / rel).is_file() for rel in FILES) and len(lines) == len(FILES)
    assert set(missing_files("skab", folder)) == set(SOURCES["skab"].files) - set(FILES)
    lines.clear()
    fetch("skab", folder, mirror=mirror.as_uri(), files=FILES, progress=lines.append)
    assert lines == []  # intact files are not fetched again


def test_corrupt_download_leaves_nothing(tmp_path, mirror):
    (mirror / FILES[0]).write_text("datetime;a\n1;2\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch("skab", tmp_path / "skab", mirror=mirror.as_uri(), files=FILES[:1])
    target_dir = tmp_path / "skab" / "data" / "valve1"
    assert not any(target_dir.iterdir())  # no partial or temporary file


def test_offline_names_every_url_to_fetch_by_hand(tmp_path, capsys):
    gone = (tmp_path / "no-mirror").as_uri()
    code = main(["data", "fetch", "ett", "--to", str(tmp_path / "ett"), "--mirror", gone])
    err = capsys.readouterr().err
    assert code == 2 and "fetch these 4 files by hand" in err
    for rel in SOURCES["ett"].files:
        assert f"{gone}/{rel}" in err and str(tmp_path / "ett" / rel) in err


def test_default_root_is_the_cache(tmp_path, mirror, monkeypatch, capsys, tracking_overrides):
    monkeypatch.setenv("TSSSM_DATA", str(tmp_path / "cache"))
    # before fetching: the error says how to get the data
    code = main(["train", "data=skab", *tracking_overrides])
    assert code == 2 and "tsssm data fetch skab" in capsys.readouterr().err
    fetch("skab", mirror=mirror.as_uri(), files=FILES)
    code = main(["train", "data=skab", "data.files=[data/valve1/0.csv]",
                 "data.extra_train_files=[]", "model.fit=em", "model.em_iters=2",
                 *tracking_overrides])
    assert code == 0, capsys.readouterr().err
