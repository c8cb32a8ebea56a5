"""`beet crnnradio` against a real MPD: each test starts its own on a loopback port.

The library is real audio (tests/audiogen.py) analysed by the tiny model through `beet crnnembed`;
MPD's music_directory is the library's folder, its output a null sink. The radio runs as a `beet`
subprocess: bounded with --stop-after, or stopped with SIGINT (Ctrl-C) after the test drove MPD.
Where a test needs to know which track is nearest which, it overwrites the stored analyses with
vectors of a known geometry (as tests/test_similar.py does).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from audiogen import write
from beetsplug.crnn import store
from conftest import GENRES, BeetsEnv, sigint_default

from beetsplug.crnn import radio as radio_module

try:
    import mpd
except ImportError:  # the [mpd] extra is missing: the tests that talk to MPD skip
    mpd = None
MPD_BIN = shutil.which("mpd") or next((p for p in ("/usr/bin/mpd", "/usr/sbin/mpd") if os.access(p, os.X_OK)), None)


def needs_mpd():
    if mpd is None:
        pytest.skip("python-mpd2 is not installed (pip install 'beets-crnn[mpd]')")
    if MPD_BIN is None:
        pytest.skip("mpd is not installed (apt-get install mpd; scripts/test.sh does it as root)")

PASSWORD = "radio-secret"
ARTISTS = ["Ada", "Bo", "Cy", "Di"]
PER_ARTIST = 3
SECONDS = 60  # long enough that no song ends by itself while a test runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class MpdServer:
    """A real MPD on 127.0.0.1 with a temporary config, database and state file."""

    def __init__(self, folder: Path, music: Path, songs: int, password: str | None = PASSWORD):
        self.folder = folder
        self.music = music
        self.songs = songs
        self.password = password
        self.port = free_port()
        self.proc = None
        folder.mkdir(parents=True, exist_ok=True)
        access = (f'password "{password}@read,add,control"\ndefault_permissions "read"\n' if password else "")
        self.conf = folder / "mpd.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            music_directory "{music}"
            db_file "{folder / 'database'}"
            state_file "{folder / 'state'}"
            log_file "{folder / 'log'}"
            bind_to_address "127.0.0.1"
            port "{self.port}"
            zeroconf_enabled "no"
            auto_update "no"
            audio_output {{
                type "null"
                name "null"
            }}
            """) + access)

    def start(self):
        self.proc = subprocess.Popen([MPD_BIN, "--no-daemon", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._ready, 30, "MPD to start and scan the library")
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"mpd exited ({self.proc.returncode}): {(self.folder / 'log').read_text()}")
        try:
            with self.client() as c:
                return "updating_db" not in c.status() and int(c.stats()["songs"]) >= self.songs
        except (OSError, mpd.ConnectionError):
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        return _Client(self.port, self.password)

    def queue(self) -> list[str]:
        with self.client() as c:
            return [e["file"] for e in c.playlistinfo()]

    def ahead(self) -> int:
        """Queue entries past the current song."""
        with self.client() as c:
            status = c.status()
        return int(status["playlistlength"]) - (int(status["song"]) + 1 if "song" in status else 0)


class _Client:
    def __init__(self, port, password):
        self.port, self.password = port, password

    def __enter__(self):
        self.c = mpd.MPDClient()
        self.c.timeout = 10
        self.c.connect("127.0.0.1", self.port)
        if self.password:
            self.c.password(self.password)
        return self.c

    def __exit__(self, *exc):
        try:
            self.c.close()
            self.c.disconnect()
        except (OSError, mpd.ConnectionError):
            pass


# ---- the library: real audio, analysed once per module ----


class Library:
    def __init__(self, root: Path, model):
        self.root = root
        self.music = root / "lib"  # beets' directory and MPD's music_directory
        self.model = model
        self.env = BeetsEnv(root, model.weights.parent)
        _set_directory(root, self.music)
        self.env.library = self.library_at(self.env.db)
        self.ids: dict[str, int] = {}  # "Ada 1" -> item id
        self.uris: dict[int, str] = {}
        for a, artist in enumerate(ARTISTS):
            for t in range(PER_ARTIST):
                title = f"{artist} {t + 1}"
                path = write(self.music / artist / f"{title}.wav", seconds=SECONDS, sr=8000,
                             kind="tonal" if a % 2 == 0 else "beat", seed=10 * a + t)
                self.ids[title] = self.env.add(path, artist=artist, title=title, album=f"{artist} album")
                self.uris[self.ids[title]] = f"{artist}/{title}.wav"
        self.env.run("crnnembed", "-q", timeout=900)
        self.env.run("crnnindex")


    def library_at(self, db: Path):
        """Opens a copy of the library: beets keeps paths relative to its directory, here the music folder."""
        from beets.library import Library as BeetsLibrary

        return lambda: BeetsLibrary(str(db), str(self.music))


def _set_directory(root: Path, directory: Path):
    config = root / "config.yaml"
    text = config.read_text()
    config.write_text(text.replace(f"directory: {root / 'lib'}", f"directory: {directory}"))


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    needs_mpd()
    return Library(tmp_path_factory.mktemp("radio-library"), tiny_model)


class Radio:
    """One test's beets config (a copy of the analysed library) pointed at one MPD."""

    def __init__(self, root: Path, library: Library, server: MpdServer):
        self.library, self.server = library, server
        self.env = BeetsEnv(root, library.model.weights.parent, "  radio:\n    poll: 0.1\n")
        _set_directory(root, library.music)
        with open(root / "config.yaml", "a") as f:
            f.write(f"mpd:\n  host: 127.0.0.1\n  port: {server.port}\n  password: {PASSWORD}\n")
        shutil.copy(library.env.db, self.env.db)
        self.env.library = library.library_at(self.env.db)
        for index in library.root.glob("crnn_index*"):
            shutil.copy(index, root / index.name)

    def run(self, *args, timeout=120):
        return self.env.run("crnnradio", *args, check=False, timeout=timeout)

    def start(self, *args):
        return subprocess.Popen([sys.executable, "-m", "beets", "crnnradio", *map(str, args)], env=self.env.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)

    @staticmethod
    def interrupt(proc, timeout=60):
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def uri(self, title):
        return self.library.uris[self.library.ids[title]]

    def set_geometry(self, placement: dict):
        """Overwrite the stored analyses: {title: degrees from e0 (towards e1)}; others far away on e2."""
        lib = self.env.library()
        model = self.library.model
        probs = np.full(len(GENRES), 0.1 / (len(GENRES) - 1), np.float32)
        probs[0] = 0.9
        for title, item_id in self.library.ids.items():
            vec = np.zeros(8, np.float32)
            if title in placement:
                vec[0], vec[1] = math.cos(math.radians(placement[title])), math.sin(math.radians(placement[title]))
            else:
                vec[2], vec[3] = 1.0, 0.01 * item_id
            item = lib.get_item(item_id)
            item.update(store.fields_for(vec, probs, model.genres, model.model_id, 0.0, time.time()))
            item.store()
        lib._close()

    def set_marks(self, title, **marks):
        lib = self.env.library()
        item = lib.get_item(self.library.ids[title])
        item.update(marks)
        item.store()
        lib._close()


@pytest.fixture
def server(tmp_path, library):
    needs_mpd()
    srv = MpdServer(tmp_path / "mpd", library.music, songs=len(library.ids)).start()
    yield srv
    srv.stop()


@pytest.fixture
def radio(tmp_path, library, server):
    return Radio(tmp_path / "beets", library, server)


def added_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("+ ")]


def file_by_title(queue):
    return [Path(uri).stem for uri in queue]


# ---- the tests ----


def test_queue_stays_ahead_as_songs_advance(radio, server):
    with server.client() as c:  # the user's own song, playing (paused: the null output plays in real time)
        c.add(radio.uri("Ada 1"))
        c.play(0)
        c.pause(1)
    proc = radio.start("--ahead", "3", "--max-per-artist", "0")
    try:
        wait_for(lambda: len(server.queue()) == 4, what="the radio to queue 3 tracks past the playing one")
        for step in range(2):
            with server.client() as c:
                c.next()
                c.pause(1)
            wait_for(lambda: server.ahead() == 3 and len(server.queue()) == 5 + step,
                     what=f"the radio to top up after next #{step + 1}")
        time.sleep(1)  # several more looks at MPD: nothing more is needed, so nothing more is added
        queue = server.queue()
        assert len(queue) == 6 and server.ahead() == 3
    finally:
        code, out, err = radio.interrupt(proc)
    assert code == 0, err
    assert queue[0] == radio.uri("Ada 1")  # the user's entry is where it was
    assert len(set(queue)) == len(queue)  # nothing queued twice, the user's song included
    assert set(queue) <= set(radio.library.uris.values())
    assert len(added_lines(out)) == 5
    assert "crnnradio added 5 tracks to MPD's queue" in out


def test_user_entries_are_untouched(radio, server):
    # The user's queued songs are the nearest to the playing one: queued already, so never added again.
    radio.set_geometry({"Bo 1": 0, "Cy 2": 3, "Di 3": 6, "Ada 1": 20, "Cy 1": 25, "Ada 2": 30})
    mine = [radio.uri(t) for t in ("Bo 1", "Cy 2", "Di 3")]
    with server.client() as c:
        ids = [c.addid(uri) for uri in mine]
        c.play(0)
        c.pause(1)
    proc = radio.start("--ahead", "4", "--max-per-artist", "0", "--no-genre")
    try:
        wait_for(lambda: len(server.queue()) == 5, what="the radio to append 2 after the user's 3")
        assert file_by_title(server.queue()[3:]) == ["Ada 1", "Cy 1"]
        with server.client() as c:  # the user queues one more, and deletes one of the radio's
            ids.append(c.addid(radio.uri("Ada 3")))
            radio_first = c.playlistinfo()[3]
            c.deleteid(radio_first["id"])
        time.sleep(1.5)  # 4 entries are still ahead: the radio must not add, move or re-add anything
        with server.client() as c:
            entries = c.playlistinfo()
    finally:
        code, out, err = radio.interrupt(proc)
    assert code == 0, err
    files = [e["file"] for e in entries]
    assert [e["id"] for e in entries if e["id"] in ids] == ids  # all the user's entries, in their order
    assert files[:3] == mine and files[-1] == radio.uri("Ada 3")
    assert len(files) == 5 and radio_first["file"] not in files
    assert len(added_lines(out)) == 2


def test_artist_cap(radio, server):
    # Ada's three tracks are the seed's nearest: without a cap they fill the queue.
    radio.set_geometry({"Ada 1": 0, "Ada 2": 3, "Ada 3": 6, "Bo 1": 20, "Cy 1": 25, "Di 1": 30, "Bo 2": 35,
                        "Cy 2": 40})
    seed = f"id:{radio.library.ids['Ada 1']}"
    uncapped = radio.run(seed, "--ahead", "5", "--stop-after", "5", "--max-per-artist", "0", "--no-genre")
    assert uncapped.returncode == 0, uncapped.stderr
    assert file_by_title(server.queue()) == ["Ada 1", "Ada 2", "Ada 3", "Bo 1", "Cy 1"]

    with server.client() as c:
        c.clear()
    capped = radio.run(seed, "--ahead", "5", "--stop-after", "5", "--max-per-artist", "1", "--artist-window", "3",
                       "--no-genre")
    assert capped.returncode == 0, capped.stderr
    titles = file_by_title(server.queue())
    assert titles == ["Ada 1", "Bo 1", "Cy 1", "Di 1", "Ada 2"]
    artists = [t.split()[0] for t in titles]
    assert all(len(set(artists[i:i + 3])) == len(artists[i:i + 3]) for i in range(len(artists)))
    assert len(added_lines(capped.stdout)) == 5


def test_query_starts_an_empty_queue_and_plays(radio, server):
    radio.set_geometry({"Cy 1": 0, "Di 2": 10, "Bo 3": 20})
    proc = radio.run("id:%d" % radio.library.ids["Cy 1"], "--ahead", "2", "--stop-after", "3", "--no-genre")
    assert proc.returncode == 0, proc.stderr
    with server.client() as c:
        status = c.status()
    assert file_by_title(server.queue()) == ["Cy 1", "Di 2", "Bo 3"]
    assert status["state"] == "play" and status["song"] == "0"
    assert "crnnradio added 3 tracks" in proc.stdout


def test_play_marks_keep_out_and_prefer(radio, server):
    radio.set_geometry({"Ada 1": 0, "Bo 1": 5, "Cy 1": 10, "Di 1": 15, "Bo 2": 20, "Cy 2": 25})
    radio.set_marks("Bo 1", last_played=time.time() - 3600)  # played an hour ago (mpdstats' mark)
    radio.set_marks("Cy 1", skip_count=5)
    radio.set_marks("Cy 2", rating=1.0)
    seed = f"id:{radio.library.ids['Ada 1']}"

    def queued(*args):
        with server.client() as c:
            c.clear()
        proc = radio.run(seed, "--ahead", "4", "--stop-after", "4", "--no-genre", "--max-per-artist", "0", *args)
        assert proc.returncode == 0, proc.stderr
        return file_by_title(server.queue())

    assert queued() == ["Ada 1", "Cy 1", "Di 1", "Bo 2"]  # the default keeps out what played in the last 4 h
    assert queued("--recent", "0") == ["Ada 1", "Bo 1", "Cy 1", "Di 1"]
    assert queued("--recent", "0.5") == ["Ada 1", "Bo 1", "Cy 1", "Di 1"]  # an hour ago is not recent then
    assert queued("--max-skips", "2") == ["Ada 1", "Di 1", "Bo 2", "Cy 2"]
    assert queued("--prefer-rated", "1") == ["Ada 1", "Cy 2", "Cy 1", "Di 1"]


def test_survives_mpd_restart(radio, server):
    radio.set_geometry({"Ada 1": 0, "Bo 1": 5, "Cy 1": 10, "Di 1": 15, "Ada 2": 20, "Bo 2": 25, "Cy 2": 30})
    proc = radio.start(f"id:{radio.library.ids['Ada 1']}", "--ahead", "2", "--no-genre", "--max-per-artist", "0")
    try:
        wait_for(lambda: len(server.queue()) == 3, what="the radio to start the queue")
        with server.client() as c:
            c.pause(1)
        before = server.queue()
        server.stop()
        time.sleep(1.5)  # the radio finds MPD gone and keeps trying
        server.start()
        with server.client() as c:
            assert [e["file"] for e in c.playlistinfo()] == before  # from MPD's state file
            c.play(0)
            c.next()
            c.pause(1)
        wait_for(lambda: len(server.queue()) == 4 and server.ahead() == 2, timeout=60,
                 what="the radio to top up after the restart")
        after = server.queue()
    finally:
        code, out, err = radio.interrupt(proc)
    assert code == 0, err
    assert after[:3] == before and len(set(after)) == 4
    assert out.count("lost the connection to MPD") == 1 and out.count("reconnected to MPD") == 1
    assert len(added_lines(out)) == 4


def test_mpd_refuses_or_is_unreachable(radio, server):
    wrong = radio.run("--password", "nope", "--stop-after", "1")
    nothing = radio.run("--password", "", "--stop-after", "1")
    away = radio.run("--port", str(free_port()), "--stop-after", "1")
    for proc, says in ((wrong, "refused the password"), (nothing, "does not let a client with no password"),
                       (away, "cannot reach MPD at 127.0.0.1:")):
        assert proc.returncode != 0
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], lines
    assert server.queue() == []


def test_track_missing_from_mpd_is_skipped(radio, server):
    # A twin of Bo 1 (same audio, so the same analysis) that MPD has not scanned: the nearest to Bo 1.
    lib = radio.env.library()
    original = lib.get_item(radio.library.ids["Bo 1"])
    twin_path = radio.library.music / "Bo" / "Bo twin.wav"
    shutil.copy(os.fsdecode(original.path), twin_path)
    from beets.library import Item

    twin = Item.from_path(str(twin_path))
    twin.update({"artist": "Twin", "title": "twin", "album": "t"})
    lib.add(twin)
    twin.update({k: original[k] for k in original.keys() if k.startswith("crnn_")})
    twin.update({store.STAMP: time.time()})
    twin.store()
    lib._close()
    try:
        proc = radio.run(f"id:{original.id}", "--ahead", "3", "--stop-after", "3", "--max-per-artist", "0",
                         "--mode", "cosine")
    finally:
        twin_path.unlink()
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "not in MPD's database" in line]
    assert len(skipped) == 1 and "Bo twin.wav" in skipped[0]
    queue = server.queue()
    assert len(queue) == 3 and queue[0] == radio.uri("Bo 1") and "Bo/Bo twin.wav" not in queue
    assert "skipped 1 that MPD could not play" in proc.stdout


def test_folder_mismatch_is_one_clear_line(radio, server):
    wrong = radio.library.music / "Ada"
    proc = radio.run(f"id:{radio.library.ids['Ada 1']}", "--music-directory", str(wrong), "--stop-after", "2")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(wrong) in errors[0] and "Ada, Bo, Cy and 1 more" in errors[0]
    assert server.queue() == []



# ---- the parts without MPD ----


def test_address_takes_mpd_host_conventions():
    assert radio_module.address("secret@example.org", "6601") == radio_module.Address("example.org", 6601, "secret")
    assert radio_module.address("pw@host", 6600, "given").password == "given"  # an explicit password wins
    assert str(radio_module.address("@mpd-socket", 6600)) == "@mpd-socket"  # abstract socket, no password in it
    assert str(radio_module.address("", 6600)) == "localhost:6600"
    with pytest.raises(radio_module.RadioError, match="port must be a number"):
        radio_module.address("localhost", "sixty")


def test_path_map(tmp_path):
    paths = radio_module.PathMap(tmp_path / "music")
    assert paths.uri(os.fsencode(tmp_path / "music" / "A b" / "c.flac")) == "A b/c.flac"
    assert paths.uri(str(tmp_path / "musicals" / "x.mp3")) is None  # a sibling folder is outside
    assert paths.uri(tmp_path / "x.mp3") is None and paths.uri(tmp_path / "music") is None
    assert paths.path("A b/c.flac") == os.fsencode(tmp_path / "music" / "A b" / "c.flac")
    assert paths.path("http://radio.example/stream") is None


def test_steering_leans_to_the_newest():
    assert radio_module.steering_weights(3, 0.5) == [0.25, 0.5, 1.0]
    old, new = np.array([1.0, 0, 0]), np.array([0, 2.0, 0])  # lengths do not matter, only directions
    v = radio_module.weighted_centroid([old, new], radio_module.steering_weights(2, 0.5))
    assert np.isclose(np.linalg.norm(v), 1) and v[1] == pytest.approx(2 * v[0])
    with pytest.raises(ValueError):
        radio_module.weighted_centroid([old, -old], [1, 1])


def test_marks_policy():
    now = 1_000_000.0
    marks = radio_module.Marks(recent_hours=4, max_skips=2, min_rating=0.3, prefer_rated=1.0)
    assert marks.keeps({}, now)
    assert not marks.keeps({"last_played": now - 3 * 3600}, now) and marks.keeps({"last_played": now - 5 * 3600}, now)
    assert marks.keeps({"skip_count": 2}, now) and not marks.keeps({"skip_count": 3}, now)
    assert not marks.keeps({"rating": 0.2}, now) and marks.keeps({"rating": 0.3}, now)
    assert marks.bonus({"rating": 0.9}) == pytest.approx(0.4) and marks.bonus({}) == 0
    assert not radio_module.Marks(recent_hours=0).active()


def test_filters_and_a_dry_library_said_once(radio, server):
    # --filter leaves two tracks besides the seed: the radio queues them, says once that nothing is left, and waits.
    proc = radio.start(f"id:{radio.library.ids['Di 1']}", "--ahead", "5", "--filter", "artist:Bo",
                       "--filter", "^title:'Bo 3'", "--max-per-artist", "0")
    try:
        wait_for(lambda: len(server.queue()) == 3, what="the seed and the two tracks the filters leave")
        time.sleep(1.5)  # about 15 more looks at MPD
        queue = server.queue()
    finally:
        code, out, err = radio.interrupt(proc)
    assert code == 0, err
    assert queue[0] == radio.uri("Di 1") and sorted(file_by_title(queue[1:])) == ["Bo 1", "Bo 2"]
    assert out.count("nothing to add: nothing more under these limits") == 1, out
