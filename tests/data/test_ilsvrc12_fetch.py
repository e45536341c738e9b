"""`imagenet fetch` / `download` / `extract` end to end on the tiny mini mirror over HTTP."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from data import ilsvrc12
from flows.cli import main as cli

NAMES = (ilsvrc12.TRAIN_ARCHIVE, ilsvrc12.VAL_ARCHIVE, ilsvrc12.AUX_ARCHIVE,
         ilsvrc12.DEVKIT_ARCHIVE)


def aux_listings(aux_tar: Path) -> dict[str, bytes]:
    with tarfile.open(aux_tar) as tar:
        return {n: tar.extractfile(n).read() for n in ilsvrc12.LISTING_FILES}


def expected_tree(mini) -> set[str]:
    paths = set()
    for path, _ in ilsvrc12.parse_listing(
            aux_listings(mini.aux_tar)["train.txt"].decode().splitlines(), "train.txt"):
        paths.add(f"train/{path}")
    for i in range(1, mini.val_images + 1):
        paths.add(f"val/{ilsvrc12.VAL_NAME_FORMAT.format(i)}")
    return paths


def image_tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for sub in ("train", "val")
            for p in (root / sub).rglob("*") if p.is_file()}


def test_full_fetch_over_http(mirror, mini_tiny, tmp_path, capsys):
    root = tmp_path / "ilsvrc12"
    argv = ["fetch", "--train", mirror.url(NAMES[0]), "--val", mirror.url(NAMES[1]),
            "--aux", mirror.url(NAMES[2]), "--devkit", mirror.url(NAMES[3]),
            "--checksums", mirror.url("MD5SUMS"), "--data-root", str(root)]
    assert cli(argv) == 0, capsys.readouterr().err
    assert image_tree(root) == expected_tree(mini_tiny)
    for name, data in aux_listings(mini_tiny.aux_tar).items():
        assert (root / name).read_bytes() == data, name
    out = capsys.readouterr().out
    assert "listings from aux, checked against devkit: 3 synsets, 12 train, 6 val" in out
    assert sorted(p.name for p in (root / "downloads").iterdir()) == sorted(NAMES + ("MD5SUMS",))

    # A rerun verifies the downloads and skips the finished extraction.
    requests = len(mirror.requests)
    assert cli(argv) == 0
    assert len(mirror.requests) == requests + 1  # only MD5SUMS again; archives verified
    out = capsys.readouterr().out
    assert "0 synsets extracted, 3 already complete" in out


def test_fetch_from_local_paths_with_kaggle_csv(mini_tiny, tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["fetch", "--train", str(mini_tiny.train_tar), "--val", mini_tiny.val_tar.as_uri(),
            "--val-solution", str(mini_tiny.val_solution), "--checksums",
            str(mini_tiny.md5sums), "--data-root", str(root)]
    assert cli(argv) == 0, capsys.readouterr().err
    for name, data in aux_listings(mini_tiny.aux_tar).items():
        assert (root / name).read_bytes() == data, name
    assert "verified in place" in capsys.readouterr().out
    assert not (root / "downloads").exists() or not list((root / "downloads").glob("*.tar"))


def test_wrong_checksum_stops_before_anything_downstream(mirror, mini_tiny, tmp_path, capsys):
    bad = tmp_path / "MD5SUMS"
    bad.write_text(mini_tiny.md5sums.read_text().replace(
        ilsvrc12.parse_md5sums(mini_tiny.md5sums.read_text(), "x")[NAMES[1]], "0" * 32))
    root = tmp_path / "root"
    code = cli(["fetch", "--train", mirror.url(NAMES[0]), "--val", mirror.url(NAMES[1]),
                "--devkit", mirror.url(NAMES[3]), "--checksums", str(bad),
                "--data-root", str(root)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("imagenet fetch: error: md5 mismatch for ILSVRC2012_img_val.tar")
    assert (root / "downloads" / (NAMES[1] + ".md5-mismatch")).is_file()
    assert not (root / "downloads" / NAMES[1]).exists()
    assert not (root / "train").exists() and not (root / "val").exists()
    assert not (root / "train.txt").exists()
    assert not mirror.requests_for(NAMES[3])  # stopped before fetching the devkit


def test_fetch_404_is_one_line(mirror, tmp_path, capsys):
    code = cli(["fetch", "--train", mirror.url("nope.tar"), "--val", mirror.url(NAMES[1]),
                "--data-root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "HTTP 404" in err


def test_download_and_extract_commands(mirror, mini_tiny, tmp_path, capsys):
    sums = ilsvrc12.parse_md5sums(mini_tiny.md5sums.read_text(), "MD5SUMS")
    assert cli(["download", mirror.url(NAMES[1]), "--to", str(tmp_path / "dl"),
                "--md5", sums[NAMES[1]]]) == 0
    assert "md5 ok" in capsys.readouterr().out
    assert cli(["extract", str(tmp_path / "dl" / NAMES[1]), "--to", str(tmp_path / "r")]) == 0
    assert len(list((tmp_path / "r" / "val").iterdir())) == mini_tiny.val_images
    assert cli(["extract", str(mini_tiny.train_tar), "--to", str(tmp_path / "r")]) == 0
    assert "3 synsets extracted" in capsys.readouterr().out
    assert cli(["extract", str(mini_tiny.train_tar), "--to", str(tmp_path / "r"),
                "--kind", "zip"]) == 1
    assert "valid: auto, train, val, archive" in capsys.readouterr().err


def test_fetch_with_a_val_archive_sorted_into_class_folders(mini_tiny, tmp_path, capsys):
    """Some re-packaged val tars are sorted into <wnid>/ folders: they label themselves, and
    the tree is flattened so that val.txt is Caffe's."""
    labels = dict(ilsvrc12.parse_listing(
        aux_listings(mini_tiny.aux_tar)["val.txt"].decode().splitlines(), "val.txt"))
    sorted_val = tmp_path / "sorted" / ilsvrc12.VAL_ARCHIVE
    sorted_val.parent.mkdir()
    with tarfile.open(mini_tiny.val_tar) as src, tarfile.open(sorted_val, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m)
            m.name = f"{mini_tiny.synsets[labels[m.name]]}/{m.name}"
            dst.addfile(m, data)
    root = tmp_path / "root"
    md5 = ilsvrc12.parse_md5sums(mini_tiny.md5sums.read_text(), "x")[ilsvrc12.TRAIN_ARCHIVE]
    sums = tmp_path / "MD5SUMS"
    sums.write_text(f"{md5}  {ilsvrc12.TRAIN_ARCHIVE}\n"
                    f"{hashlib.md5(sorted_val.read_bytes()).hexdigest()}  {sorted_val.name}\n")
    assert cli(["fetch", "--train", str(mini_tiny.train_tar), "--val", str(sorted_val),
                "--synset-words", str(mini_tiny.synset_mapping), "--checksums", str(sums),
                "--data-root", str(root)]) == 0, capsys.readouterr().err
    for name, data in aux_listings(mini_tiny.aux_tar).items():
        assert (root / name).read_bytes() == data, name
    assert image_tree(root) == expected_tree(mini_tiny)
    assert "listings from val-tree" in capsys.readouterr().out


def test_fetch_and_download_never_show_url_credentials(mirror, mini_tiny, tmp_path, capsys):
    """user:pass@ and signed query values reach the mirror but no output line or file."""
    root = tmp_path / "root"
    cred = "http://al:FetchPw1@"
    argv = ["fetch", "--train", mirror.url(NAMES[0]).replace("http://", cred),
            "--val", mirror.url(NAMES[1]) + "?sig=FetchSig2", "--aux", mirror.url(NAMES[2]),
            "--checksums", mirror.url("MD5SUMS").replace("http://", cred),
            "--data-root", str(root)]
    assert cli(argv) == 0, capsys.readouterr().err
    assert mirror.requests_for(NAMES[0])[0]["authorization"].startswith("Basic ")
    assert mirror.requests_for(NAMES[1])[0][":target"].endswith("?sig=FetchSig2")
    code = cli(["download", mirror.url("gone.tar").replace("http://", cred) + "?token=FetchTok3",
                "--to", str(tmp_path / "dl")])
    out = capsys.readouterr()
    assert code == 1 and "HTTP 404" in out.err and "token=***" in out.err
    for secret in ("FetchPw1", "FetchSig2", "FetchTok3"):
        assert secret not in out.out + out.err
        assert not [p for p in tmp_path.rglob("*") if p.is_file() and
                    secret.encode() in p.read_bytes()]
