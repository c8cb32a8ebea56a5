import os
import stat
import sys

import pytest

from beetsplug.crnn import m3u
from beetsplug.crnn.errors import PlaylistError
from beetsplug.crnn.m3u import Entry, is_m3u8, render, write


def test_relative_m3u_exact_bytes():
    entries = [
        Entry(b"/music/Artist/Album/01 One.mp3", 215.6, "Artist", "One"),
        Entry("/music/lists/sub/two.flac", None, "Band\nName", "Two,\r\nlines"),
        Entry(b"/elsewhere/three.ogg", 59.4, "", "Three"),
    ]
    assert render(entries, base_dir=b"/music/lists", utf8=False) == (
        b"#EXTM3U\n"
        b"#EXTINF:216,Artist - One\n"
        b"../Artist/Album/01 One.mp3\n"
        b"#EXTINF:-1,Band Name - Two, lines\n"
        b"sub/two.flac\n"
        b"#EXTINF:59,Three\n"
        b"../../elsewhere/three.ogg\n"
    )


def test_m3u8_non_ascii_absolute():
    entries = [Entry("/music/Sigur Rós/Ágætis byrjun/Svefn-g-englar.flac", 604.0, "Sigur Rós", "Svefn-g-englar"),
               Entry("/music/Björk/Homogenic/Jóga.mp3".encode(), 305.2, "Björk", "Jóga")]
    assert render(entries) == (
        "#EXTM3U\n"
        "#EXTINF:604,Sigur Rós - Svefn-g-englar\n"
        "/music/Sigur Rós/Ágætis byrjun/Svefn-g-englar.flac\n"
        "#EXTINF:305,Björk - Jóga\n"
        "/music/Björk/Homogenic/Jóga.mp3\n"
    ).encode("utf-8")


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="needs a UTF-8 filesystem encoding")
def test_undecodable_path_bytes_survive():
    entry = Entry(b"/music/caf\xe9.mp3", 1.0, "A", "Caf\u00e9")
    assert render([entry], utf8=False).endswith(b"#EXTINF:1,A - Caf\xc3\xa9\n/music/caf\xe9.mp3\n")
    assert render([entry], utf8=True).endswith(b"\n/music/caf\xe9.mp3\n")


def test_empty_playlist():
    assert render([]) == b"#EXTM3U\n"


def test_line_break_in_path_is_refused():
    with pytest.raises(PlaylistError, match="line break"):
        render([Entry("/music/a\nb.mp3", 1.0, "A", "B")])


@pytest.mark.parametrize("path, force, expected", [
    ("mix.m3u8", False, True), ("MIX.M3U8", False, True), (b"/x/mix.m3u8", False, True),
    ("mix.m3u", False, False), ("mix.m3u8.bak", False, False), ("mix.m3u", True, True),
])
def test_is_m3u8(path, force, expected):
    assert is_m3u8(path, force_utf8=force) is expected


def test_write_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "mix.m3u"
    write(target, [Entry(str(tmp_path / "a" / "t.mp3"), 3.0, "X", "Y")], base_dir=target.parent, utf8=False)
    assert target.read_bytes() == b"#EXTM3U\n#EXTINF:3,X - Y\n../t.mp3\n"
    assert os.listdir(target.parent) == ["mix.m3u"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_overwrite_keeps_mode(tmp_path):
    target = tmp_path / "mix.m3u8"
    target.write_bytes(b"old")
    target.chmod(0o664)
    write(target, [])
    assert target.read_bytes() == b"#EXTM3U\n" and stat.S_IMODE(target.stat().st_mode) == 0o664
    assert os.listdir(tmp_path) == ["mix.m3u8"]


def test_unwritable_path_raises_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am not a directory")
    with pytest.raises(PlaylistError) as err:
        write(blocker / "mix.m3u", [Entry("/m/a.mp3", 1.0, "A", "B")])
    msg = str(err.value)
    assert msg.startswith(f"cannot write playlist {blocker / 'mix.m3u'}: ") and "\n" not in msg


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "mix.m3u"
    target.write_bytes(b"#EXTM3U\nold\n")

    def fail(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(m3u.os, "replace", fail)
    with pytest.raises(PlaylistError, match="Permission denied"):
        write(target, [Entry("/m/a.mp3", 1.0, "A", "B")])
    monkeypatch.undo()
    assert target.read_bytes() == b"#EXTM3U\nold\n"
    assert os.listdir(tmp_path) == ["mix.m3u"]
