"""Saved mixes: crnn.playlists, `beet crnnplaylists`, and regeneration after `beet import` when auto is on."""

from __future__ import annotations

import textwrap

import pytest

from audiogen import write
from beetsplug.crnn import mixes, search
from test_similar import albums, geometry  # noqa: F401  (fixtures)

MIXES = """\
  playlist_dir: {lists}
  playlists:
    - name: near-seed
      query: title:seed
      n: 2
      mode: cosine
      include_seed: yes
    - name: filtered.m3u8
      query: title:seed
      n: 2
      mode: cosine
      filter: ^title:t10
    - name: drift
      query: title:seed
      to: title:t60
      n: 3
      mode: cosine
"""


def configure(env, text):
    with open(env.root / "config.yaml", "a") as f:
        f.write(text)


def entry(env, title, artist=None):
    return f"#EXTINF:200,{artist or 'Artist ' + title} - {title}\n{env.music / (title + '.mp3')}\n".encode()


def test_crnnplaylists_writes_exact_bytes(geometry, tmp_path):  # noqa: F811
    env, ids = geometry
    lists = tmp_path / "lists"
    configure(env, MIXES.format(lists=lists))
    env.run("crnnplaylists")
    assert sorted(p.name for p in lists.iterdir()) == ["drift.m3u", "filtered.m3u8", "near-seed.m3u"]  # no temp files
    assert (lists / "near-seed.m3u").read_bytes() == (
        b"#EXTM3U\n" + entry(env, "seed", "Seed Artist") + entry(env, "t10") + entry(env, "t20"))
    assert (lists / "filtered.m3u8").read_bytes() == b"#EXTM3U\n" + entry(env, "t20") + entry(env, "t30")
    # The path's steps at 0, 30 and 60 deg; t60 is its TO seed, so the last step is t50.
    assert (lists / "drift.m3u").read_bytes() == (
        b"#EXTM3U\n" + entry(env, "t10") + entry(env, "t30") + entry(env, "t50"))


def test_crnnplaylists_by_name_and_regenerated(geometry, tmp_path):  # noqa: F811
    env, ids = geometry
    lists = tmp_path / "lists"
    configure(env, MIXES.format(lists=lists))
    env.run("crnnplaylists", "near-seed", "drift.m3u")
    assert sorted(p.name for p in lists.iterdir()) == ["drift.m3u", "near-seed.m3u"]
    env.run("rm", "-f", f"id:{ids[10]}")
    env.run("crnnplaylists", "near-seed")
    assert (lists / "near-seed.m3u").read_bytes() == (
        b"#EXTM3U\n" + entry(env, "seed", "Seed Artist") + entry(env, "t20") + entry(env, "t30"))
    proc = env.run("crnnplaylists", "nope", check=False)
    assert proc.returncode != 0 and "no mix named nope" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_mix_does_not_stop_the_others(geometry, tmp_path):  # noqa: F811
    env, ids = geometry
    lists = tmp_path / "lists"
    configure(env, MIXES.format(lists=lists) + textwrap.indent(textwrap.dedent("""\
        - name: broken
          query: title:no-such-track
        """), "    "))
    proc = env.run("crnnplaylists", check=False)
    assert proc.returncode != 0
    assert "mix broken: no tracks match the query 'title:no-such-track'" in proc.stderr
    assert "1 of 4 saved mixes could not be written" in proc.stderr
    assert sorted(p.name for p in lists.iterdir()) == ["drift.m3u", "filtered.m3u8", "near-seed.m3u"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("    - name: x\n      query: title:seed\n      number: 3\n", "mix 'x': unknown key(s) number"),
        ("    - query: title:seed\n", "entry 1 has no name"),
        ("    - name: x\n      query: title:seed\n      n: 0\n", "mix 'x': n must be at least 1"),
        ("    - name: x\n      query: title:seed\n      order: random\n", "mix 'x': order must be one of"),
        ("    - name: x\n      query: title:seed\n      albums: yes\n      to: title:t60\n", "made of tracks"),
    ],
)
def test_bad_mix_config_is_one_line(geometry, bad, message):  # noqa: F811
    env, ids = geometry
    configure(env, "  playlists:\n" + bad)
    proc = env.run("crnnplaylists", check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_parse_fills_defaults_and_adds_filters():
    defaults = search.Settings(mode="genre", genre_weight=0.3, max_per_artist=2, order="smooth", filters=["year:2000.."])
    (mix,) = mixes.parse([{"name": "a.m3u8", "query": "artist:X", "filter": "^genre:christmas", "albums": True}],
                         defaults)
    assert mix.file_name == "a.m3u8" and mix.n == 10 and mix.albums and mix.to is None
    assert mix.settings == search.Settings(mode="genre", genre_weight=0.3, max_per_artist=2, order="smooth",
                                           filters=["year:2000..", "^genre:christmas"])
    (mix,) = mixes.parse([{"name": "b", "query": "q", "max_per_artist": 0, "genre_weight": 1}], defaults)
    assert mix.file_name == "b.m3u" and mix.settings.max_per_artist is None and mix.settings.genre_weight == 1.0
    with pytest.raises(mixes.MixError, match="another mix writes b.m3u"):
        mixes.parse([{"name": "b", "query": "q"}, {"name": "b.m3u", "query": "r"}], defaults)
    assert [m.name for m in mixes.chosen(mixes.parse([{"name": "b", "query": "q"}, {"name": "c", "query": "q"}],
                                                     defaults), ["c.m3u"])] == ["c"]


def test_mixes_follow_an_import_when_auto(beets_env, tmp_path):
    """`beet import -A` of files without tags, with auto on: they are analysed, then the mix is regenerated.

    Every one of these files is untagged, so this is also the issue's case end to end.
    """
    env = beets_env
    incoming = env.music / "incoming"
    incoming.mkdir()
    for i in range(2):
        write(incoming / f"tonal{i}.wav", 8.0, kind="tonal", seed=i)
        write(incoming / f"beat{i}.wav", 8.0, kind="beat", seed=i)
    lists = tmp_path / "lists"
    configure(env, f"  auto: yes\n  playlist_dir: {lists}\n  playlists:\n"
                   "    - name: tonal\n      query: path::tonal0\n      n: 5\n")
    env.run("import", "-A", "-q", str(incoming))
    text = (lists / "tonal.m3u").read_text()
    paths = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(paths) == sorted(str(incoming / f"{name}.wav") for name in ("tonal1", "beat0", "beat1"))


def test_album_mix(albums, tmp_path):  # noqa: F811
    env, ids, _ = albums
    lists = tmp_path / "lists"
    configure(env, f"  playlist_dir: {lists}\n  relative_to: playlist\n  playlists:\n"
                   f"    - name: albums.m3u8\n      query: id:{ids['seed']}\n      albums: yes\n      n: 1\n"
                   "      mode: cosine\n")
    env.run("crnnplaylists")
    rel = lambda t: f"../{env.music.relative_to(tmp_path)}/Near/{t}.mp3"  # noqa: E731
    assert (lists / "albums.m3u8").read_text() == (
        f"#EXTM3U\n#EXTINF:101,NA - n1\n{rel('n1')}\n#EXTINF:102,NA - n2\n{rel('n2')}\n")
