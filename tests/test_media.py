"""Media I/O on the real fixture files: probing, frame timing, audio alignment, encoding."""

from __future__ import annotations

import subprocess

import av
import numpy as np
import pytest
import scipy.signal as ss
import soundfile as sf

from conftest import CLIP, VFR_CLIP, WAV_16K, WAV_24BIT
from talkcli.media.audio import aligned_audio, load_audio
from talkcli.media.decode import CropBox, iter_frames
from talkcli.media.encode import VideoWriter, mux
from talkcli.media.ffmpeg import ffmpeg_exe
from talkcli.media.probe import probe


def _thumb(rgb: np.ndarray, f: int = 4) -> np.ndarray:
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    return rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))


def test_probe_constant_rate_clip():
    info = probe(CLIP)
    v, a = info.video, info.audio
    assert (v.width, v.height, v.frames, v.vfr, v.rotation) == (512, 512, 200, False, 0)
    assert v.avg_fps == pytest.approx(25.0)
    assert (a.sample_rate, a.channels) == (16000, 2)
    assert info.frame_count(25) == 200


def test_probe_variable_rate_clip():
    info = probe(VFR_CLIP)
    assert info.video.vfr
    assert info.video.start == pytest.approx(0.033, abs=1e-3)  # the stream starts late
    assert info.video.frames == 135
    assert info.frame_count(25) == 153  # 6.133 s of video on the 25 fps timeline
    assert info.audio.sample_rate == 44100


def test_decode_gives_every_frame_of_the_constant_rate_clip():
    info = probe(CLIP)
    frames = list(iter_frames(info, 25, size=64))
    assert abs(len(frames) - 200) <= 1
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    # A talking head: consecutive frames differ, the clip is not one repeated picture.
    assert np.abs(frames[0].astype(int) - frames[100].astype(int)).mean() > 2


def test_vfr_frames_are_the_source_frames_on_screen_at_each_interval_centre():
    """Frame i of the 25 fps timeline shows the source frame displayed at (i + 0.5) / 25 s."""
    src_times, src_thumbs = [], []
    with av.open(str(VFR_CLIP)) as c:
        for fr in c.decode(video=0):
            src_times.append(fr.time)
            src_thumbs.append(_thumb(fr.to_ndarray(format="rgb24")))
    src_times = np.array(src_times)
    src = np.stack(src_thumbs)
    info = probe(VFR_CLIP)
    out = [_thumb(f) for f in iter_frames(info, 25)]
    assert len(out) == 153
    centres = (np.arange(len(out)) + 0.5) / 25
    expected = np.maximum(np.searchsorted(src_times, centres) - 1, 0)
    matched = np.array([np.abs(src - o).mean(axis=(1, 2, 3)).argmin() for o in out])
    assert (matched == expected).mean() == 1.0
    # the late start is padded with the first frame, not shifted away
    assert matched[0] == 0


def test_vfr_audio_is_in_sync_with_the_frame_timeline():
    info = probe(VFR_CLIP)
    n = info.frame_count(25)
    ours = aligned_audio(info, 16000, n * 640)
    assert ours.size == n * 640  # exactly as long as the frames
    # Reference: PyAV's own decode of the AAC track, placed at its timestamps, resampled to 16 kHz.
    with av.open(str(VFR_CLIP)) as c:
        frames = list(c.decode(audio=0))
        assert frames[0].time == pytest.approx(0.0, abs=1e-3)
        ref = np.concatenate([f.to_ndarray().mean(axis=0) for f in frames])
    ref = ss.resample_poly(ref, 160, 441)
    m = min(ref.size, ours.size)
    xc = ss.correlate(ours[:m], ref[:m], mode="full", method="fft")
    lag = int(np.argmax(xc)) - (m - 1)
    assert abs(lag) <= 8  # within half a millisecond
    assert np.corrcoef(ours[:m], ref[:m])[0, 1] > 0.999


def test_24bit_48k_wav_converts_to_16k_mono():
    ours = load_audio(WAV_24BIT, 16000)
    ref, sr = sf.read(str(WAV_24BIT), dtype="float64")
    assert sr == 48000 and ref.ndim == 2
    ref = ss.resample_poly(ref.mean(axis=1), 1, 3)
    assert abs(ours.size - ref.size) <= 2
    m = min(ours.size, ref.size)
    assert np.corrcoef(ours[:m], ref[:m])[0, 1] > 0.9995
    # the level is preserved: no 24-bit misread, no louder-than-source downmix
    assert np.std(ours[:m]) / np.std(ref[:m]) == pytest.approx(1.0, abs=0.01)


def test_16k_stereo_wav_is_averaged_not_summed():
    ours = load_audio(WAV_16K, 16000)
    ref, _ = sf.read(str(WAV_16K), dtype="float32")
    np.testing.assert_allclose(ours, ref.mean(axis=1), atol=2e-4)


def test_rotation_metadata_is_applied(tmp_path):
    ff = ffmpeg_exe()
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    subprocess.run([ff, "-v", "error", "-y", "-i", str(CLIP), "-t", "0.4", "-vf", "crop=320:240:0:0",
                    "-c:v", "libx264", "-an", str(plain)], check=True)
    subprocess.run([ff, "-v", "error", "-y", "-display_rotation", "90", "-i", str(plain), "-c", "copy",
                    str(rotated)], check=True)
    info = probe(rotated)
    assert (info.video.width, info.video.height, info.video.rotation) == (240, 320, 90)
    a = next(iter_frames(probe(plain), 25)).astype(int)
    b = next(iter_frames(info, 25)).astype(int)
    assert b.shape == (320, 240, 3)
    assert np.abs(np.rot90(a, 1) - b).mean() < 1.0  # 90° counter-clockwise, as displayed


def test_crop_and_scale(tmp_path):
    info = probe(CLIP)
    full = next(iter_frames(info, 25, n_frames=1))
    crop = next(iter_frames(info, 25, crop=CropBox(100, 50, 200, 200), size=200, n_frames=1))
    assert np.abs(full[50:250, 100:300].astype(int) - crop.astype(int)).mean() < 1.0


def test_encode_odd_size_with_audio_and_mux(tmp_path):
    out = tmp_path / "out.mp4"
    frames = []
    with VideoWriter(out, 25, (101, 64), audio=WAV_16K, crf=10) as vw:
        for i in range(50):
            f = np.full((64, 101, 3), 20, np.uint8)
            f[:, 2 * i: 2 * i + 4] = 230  # a bar that moves 2 px per frame
            frames.append(f)
            vw.write(f)
    info = probe(out)
    assert (info.video.codec, info.video.width, info.video.height) == ("h264", 102, 64)  # padded to even
    assert info.video.frames == 50 and info.video.start == 0
    assert info.audio is not None and info.audio.end == pytest.approx(2.0, abs=0.05)  # cut to the video
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for i in (0, 25, 49):
        assert int(np.argmax(decoded[i][32, :, 0])) in range(2 * i, 2 * i + 4)
    # mux: replace the audio of a silent copy, video stream copied
    silent = tmp_path / "silent.mp4"
    with VideoWriter(silent, 25, (64, 64)) as vw:
        for _ in range(25):
            vw.write(np.zeros((64, 64, 3), np.uint8))
    assert probe(silent).audio is None
    muxed = tmp_path / "muxed.mp4"
    mux(silent, WAV_16K, muxed)
    m = probe(muxed)
    assert m.audio is not None and m.video.frames == 25 and m.audio.end == pytest.approx(1.0, abs=0.05)


def test_failed_encode_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, 25, (64, 64)) as vw:
            vw.write(np.zeros((64, 64, 3), np.uint8))
            raise RuntimeError("renderer crashed")
    assert list(tmp_path.iterdir()) == []
