"""Where the floor's CPU goes: decode vs stereo mixdown vs resample vs log-mel, per track, one thread.

    nice -n 19 python bench/frontend.py                 # 8 generated 3-minute 44.1 kHz stereo MP3s
    nice -n 19 python bench/frontend.py --windows 2 --repeat 5

Each stage runs on the spans crnnembed decodes (``audio.plan_windows``), in one thread, and its
CPU time is the best of ``--repeat`` runs (the machine may be busy). Resampler choices are
shown with their CPU and how far they move the model input (dB below each window's peak,
the CRNN's real input) from the soxr "HQ" that the front end uses; log-mel with this front
end (numpy FFT, one call for all windows) beside librosa's (the one it replaced), when
librosa is installed. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, print_json, table  # noqa: E402
from embed import generated_files, quiet_fd2  # noqa: E402


def cpu_best(fn, repeat):
    best, out = math.inf, None
    for _ in range(repeat):
        c = time.process_time()
        out = fn()
        best = min(best, time.process_time() - c)
    return best, out


def librosa_log_mel(y):
    """The front end before this one (librosa's STFT and mel filters), for comparison only."""
    import librosa

    from beetsplug.crnn.features import AMIN, FMAX

    stft = librosa.stft(y, n_fft=2048, hop_length=512, window="hann", center=False)
    basis = librosa.filters.mel(sr=22050, n_fft=2048, n_mels=96, fmax=FMAX)
    power = (stft.real**2 + stft.imag**2).astype(np.float32)
    return (10.0 * np.log10(np.maximum(basis @ power, AMIN))).astype(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    import soundfile
    import soxr

    from beetsplug.crnn import audio
    from beetsplug.crnn.features import log_mels, model_input

    with tempfile.TemporaryDirectory() as tmp:
        files = generated_files(args.tracks, 180.0, 44100, 2, min(args.tracks, 8), Path(tmp) / "music")
        spans = []  # per file: (native sr, [2-D float32 blocks at the native rate])
        decode_cpu = 0.0
        for f in files:
            sr = soundfile.info(str(f)).samplerate
            n = int(soundfile.info(str(f)).frames * audio.SAMPLE_RATE / sr)

            def decode():
                with quiet_fd2(), soundfile.SoundFile(str(f)) as sf:
                    blocks = []
                    for start in audio.plan_windows(n, args.windows):
                        a = int(start * sr / audio.SAMPLE_RATE)
                        b = int(math.ceil((start + audio.WINDOW_SAMPLES) * sr / audio.SAMPLE_RATE)) + 1
                        sf.seek(a)
                        blocks.append(sf.read(b - a, dtype="float32", always_2d=True))
                    return blocks

            cpu, blocks = cpu_best(decode, args.repeat)
            decode_cpu += cpu
            spans.append((sr, blocks))
    per = lambda total: total / len(spans)  # noqa: E731
    mix_cpu, monos = cpu_best(lambda: [[audio._mono(b) for b in blocks] for _, blocks in spans], args.repeat)
    mean_cpu, _ = cpu_best(lambda: [[b.mean(axis=1) for b in blocks] for _, blocks in spans], args.repeat)

    def resample_with(fn):
        return lambda: [[audio.fit_window(fn(y, sr)) for y in ys] for (sr, _), ys in zip(spans, monos)]

    resamplers = {
        "soxr HQ (in use)": lambda y, sr: soxr.resample(y, sr, audio.SAMPLE_RATE, quality="HQ"),
        "soxr MQ": lambda y, sr: soxr.resample(y, sr, audio.SAMPLE_RATE, quality="MQ"),
        "soxr LQ": lambda y, sr: soxr.resample(y, sr, audio.SAMPLE_RATE, quality="LQ"),
        "soxr VHQ": lambda y, sr: soxr.resample(y, sr, audio.SAMPLE_RATE, quality="VHQ"),
    }
    try:  # integer-ratio polyphase decimation (44.1 -> 22.05 kHz is 1/2), when scipy is installed
        from scipy.signal import resample_poly

        g = math.gcd(spans[0][0], audio.SAMPLE_RATE)
        resamplers["scipy resample_poly (integer ratio)"] = lambda y, sr: resample_poly(
            y, audio.SAMPLE_RATE // g, sr // g).astype(np.float32)
    except ImportError:
        pass
    reference = None
    rows, record = [], {"machine": machine(), "tracks": len(spans), "windows": args.windows,
                        "source": "generated 180 s 44.1 kHz stereo MP3", "cpu_s_per_track": {}}
    rows.append(["decode (libsndfile, the windows' spans)", f"{per(decode_cpu):.4f}", ""])
    rows.append(["stereo mixdown: columns added, halved (in use)", f"{per(mix_cpu):.4f}", ""])
    rows.append(["stereo mixdown: data.mean(axis=1) (before)", f"{per(mean_cpu):.4f}", ""])
    record["cpu_s_per_track"].update(decode=per(decode_cpu), mixdown=per(mix_cpu), mixdown_mean_before=per(mean_cpu))
    for name, fn in resamplers.items():
        cpu, windows = cpu_best(resample_with(fn), args.repeat)
        x = model_input(log_mels(np.stack([w for ws in windows for w in ws])))
        if reference is None:
            reference, windows_hq = x, windows
        diff = float(np.max(np.abs(x - reference)))
        rows.append([f"resample: {name}", f"{per(cpu):.4f}", f"{diff:.2g}"])
        record["cpu_s_per_track"][f"resample {name}"] = per(cpu)
        record.setdefault("model_input_max_db_vs_hq", {})[name] = diff
    stacked = [np.stack(ws) for ws in windows_hq]
    cpu, mels = cpu_best(lambda: [log_mels(w) for w in stacked], args.repeat)
    rows.append(["log-mel: numpy FFT, all windows in one call (in use)", f"{per(cpu):.4f}", ""])
    record["cpu_s_per_track"]["log-mel (in use)"] = per(cpu)
    try:
        import librosa  # noqa: F401
    except ImportError:
        librosa = None
    if librosa is not None:
        librosa_log_mel(stacked[0][0])  # its import and filters: not counted
        cpu, old = cpu_best(lambda: [np.stack([librosa_log_mel(w) for w in ws]) for ws in stacked], args.repeat)
        diff = max(float(np.max(np.abs(model_input(a) - model_input(b)))) for a, b in zip(mels, old))
        rows.append(["log-mel: librosa, one window a call (before)", f"{per(cpu):.4f}", f"{diff:.2g}"])
        record["cpu_s_per_track"]["log-mel librosa (before)"] = per(cpu)
        record["log_mel_max_db_vs_librosa"] = diff
    print(table(rows, ["stage", "CPU s / track", "model input max |diff| dB"]))
    print_json(record)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
