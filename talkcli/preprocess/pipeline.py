"""``talk preprocess``: video -> workspace artifacts, one cached stage at a time.

    probe ──> detect ──> frames ──> landmarks ──> matting     matting/, previews/matting.png
      │                    │            └──────> facefit     facefit.npz, transforms.json,
      │                    └───────────────────────┘           previews/tracking.mp4
      └────> audio ──> audio_features                        audio/audio.wav, audio/features.npz

Each stage reads its upstream's artifacts from disk, writes its own atomically and is skipped
when its record in the manifest matches (see workspace.py). Heavy libraries (mediapipe, librosa,
scipy) are imported inside the stages that use them, so checking an up-to-date workspace is quick.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import progress
from ..config import (AUDIO_FIELDS, DETECT_FIELDS, FACEFIT_FIELDS, FEATURE_FIELDS, FRAMES_FIELDS,
                      LANDMARK_FIELDS, MATTING_FIELDS, PROBE_FIELDS, PreprocessConfig)
from ..errors import InputError
from ..media.decode import CropBox, frame_size, iter_frames
from ..media.probe import AudioInfo, MediaInfo, VideoInfo, duration_str, probe
from ..workspace import Workspace, atomic_path, read_json, run_stage, source_fingerprint, write_json
from .detect import quiet_native_stderr
from .frameio import BackgroundWriter, read_frames, write_image

# Bump when a stage's algorithm changes in a way that changes its outputs: its key changes, so
# existing workspaces redo it and everything downstream.
CODE_VERSIONS = {"probe": 1, "detect": 1, "frames": 1, "landmarks": 1, "matting": 1, "facefit": 1, "audio": 1,
                 "audio_features": 1}

PROBE_JSON = "source/probe.json"
FACES_NPZ = "detect/faces.npz"
CROP_JSON = "detect/crop.json"
FRAMES_DIR = "frames"
FRAMES_JSON = "frames/frames.json"
LANDMARKS_NPZ = "landmarks.npz"
MATTING_DIR = "matting"
MATTING_PREVIEW = "previews/matting.png"
FACEFIT_NPZ = "facefit.npz"
TRANSFORMS_JSON = "transforms.json"
TRACKING_PREVIEW = "previews/tracking.mp4"
AUDIO_WAV = "audio/audio.wav"
FEATURES_NPZ = "audio/features.npz"


def default_workspace(video: Path) -> Path:
    return Path.cwd() / Path(video).stem


def load_probe(ws: Workspace) -> tuple[MediaInfo, dict]:
    data = read_json(ws.path(PROBE_JSON))
    media = dict(data["media"])
    media["video"] = VideoInfo(**media["video"]) if media["video"] else None
    media["audio"] = AudioInfo(**media["audio"]) if media["audio"] else None
    return MediaInfo(**media), data["timeline"]


def run(ws: Workspace, video: Path, cfg: PreprocessConfig, *, force: bool = False) -> dict:
    """Run every preprocess stage that is not up to date; return a summary for humans and JSON."""
    t0 = time.time()
    cfg.validate()
    video = Path(video)
    if not video.is_file():
        raise InputError(f"input not found: {video}" if not video.exists() else f"input is not a file: {video}")
    previous = ws.source()
    same_path = previous is not None and previous.get("path") == str(video.resolve())
    try:
        fp = source_fingerprint(video, previous=previous if same_path else None, workspace=ws.root)
    except OSError as exc:
        raise InputError(f"cannot read {video}: {exc.strerror}") from exc
    if previous != fp:
        ws.set_source(fp)

    results = []

    def stage(name: str, deps: dict, fields: tuple, outputs: list[str], fn) -> dict:
        res = run_stage(ws, name, code_version=CODE_VERSIONS[name], config=cfg.fields(*fields), inputs=deps,
                        outputs=outputs, fn=fn, force=force)
        results.append(res)
        verb = "up to date" if res.skipped else f"done in {res.record['seconds']:.1f} s"
        progress.info(f"[green]✓[/green] {name:<15} {verb}")
        return res.record

    probe_rec = stage("probe", {"source": fp}, PROBE_FIELDS, [PROBE_JSON],
                      lambda: _probe(ws, video, cfg))
    info, timeline = load_probe(ws)
    detect_rec = stage("detect", {"probe": probe_rec["output_key"]}, DETECT_FIELDS, [FACES_NPZ, CROP_JSON],
                       lambda: _detect(ws, info, timeline, cfg))
    frames_rec = stage("frames", {"detect": detect_rec["output_key"]}, FRAMES_FIELDS, [FRAMES_DIR],
                       lambda: _frames(ws, info, timeline, cfg))
    lms_rec = stage("landmarks", {"frames": frames_rec["output_key"]}, LANDMARK_FIELDS, [LANDMARKS_NPZ],
                    lambda: _landmarks(ws, timeline, cfg))
    mat_rec = stage("matting", {"frames": frames_rec["output_key"], "landmarks": lms_rec["output_key"]}, MATTING_FIELDS,
                    [MATTING_DIR, MATTING_PREVIEW], lambda: _matting(ws))
    fit_rec = stage("facefit", {"frames": frames_rec["output_key"], "landmarks": lms_rec["output_key"]}, FACEFIT_FIELDS,
                    [FACEFIT_NPZ, TRANSFORMS_JSON, TRACKING_PREVIEW], lambda: _facefit(ws, timeline, cfg))
    audio_rec = stage("audio", {"probe": probe_rec["output_key"]}, AUDIO_FIELDS, [AUDIO_WAV],
                      lambda: _audio(ws, info, timeline, cfg))
    feats_rec = stage("audio_features", {"audio": audio_rec["output_key"]}, FEATURE_FIELDS, [FEATURES_NPZ],
                      lambda: _features(ws, timeline, cfg))

    return {
        "workspace": str(ws.root),
        "source": str(video.resolve()),
        "frames": timeline["n_frames"],
        "fps": timeline["fps"],
        "size": cfg.size,
        "crop": read_json(ws.path(CROP_JSON))["box"],
        "face_fraction": detect_rec["summary"]["face_fraction"],
        "multi_face_frames": detect_rec["summary"]["multi_face_frames"],
        "landmarks": lms_rec["summary"],
        "matting": mat_rec["summary"],
        "quality": fit_rec["summary"]["quality"],
        "audio": audio_rec["summary"],
        "audio_features": feats_rec["summary"],
        "frames_summary": frames_rec["summary"],
        "stages": {r.name: {"skipped": r.skipped, "seconds": r.record["seconds"]} for r in results},
        "seconds": round(time.time() - t0, 3),
    }


# --------------------------------------------------------------------------- stages


def _probe(ws: Workspace, video: Path, cfg: PreprocessConfig) -> dict:
    info = probe(video)
    if info.video is None:
        raise InputError(f"{video.name} has no video stream (audio only?); talk preprocess needs a video of the subject")
    n = info.frame_count(cfg.fps)
    if n < 2:
        raise InputError(f"{video.name} is too short: {info.video.duration:.2f} s of video")
    timeline = {"fps": cfg.fps, "n_frames": n, "duration": n / cfg.fps,
                "frame_time": "frame i covers [i/fps, (i+1)/fps) s of the source timeline"}
    ws.path("source").mkdir(exist_ok=True)
    write_json(ws.path(PROBE_JSON), {"media": info.to_dict(), "timeline": timeline})
    v = info.video
    progress.info(
        f"  {video.name}: {v.width}x{v.height} {v.codec}, {v.avg_fps:g} fps{' (variable)' if v.vfr else ''}"
        f"{f', rotated {v.rotation}°' if v.rotation else ''}, {duration_str(v.duration)}; "
        + (f"audio {info.audio.codec} {info.audio.sample_rate} Hz x{info.audio.channels}" if info.audio else "no audio")
        + f" -> {n} frames at {cfg.fps:g} fps"
    )
    return {"n_frames": n, "vfr": v.vfr, "rotation": v.rotation, "has_audio": info.audio is not None,
            "source_fps": v.avg_fps, "source_size": [v.width, v.height]}


def _detect(ws: Workspace, info: MediaInfo, timeline: dict, cfg: PreprocessConfig) -> dict:
    from .detect import FaceTrack, choose_crop, detect_faces

    n = timeline["n_frames"]
    assert info.video is not None
    if cfg.crop == "auto":
        w, _ = frame_size(info, None, None, cfg.detect_max_side)
        scale = info.video.width / w
        with quiet_native_stderr(), progress.bar("detecting faces", n) as bar:
            frames = iter_frames(info, cfg.fps, max_side=cfg.detect_max_side, n_frames=n)
            track = detect_faces(frames, n, scale, bar)
    else:  # manual or full-frame crop: no detection needed
        track = FaceTrack(np.full((n, 4), np.nan, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int16))
    box, stats = choose_crop(track, info, cfg)
    if stats["multi_face_frames"]:
        progress.warn(f"{stats['multi_face_frames']} of {n} frames show more than one face; the largest is used")
    if cfg.crop == "auto" and stats["face_fraction"] < 0.98:
        progress.warn(f"no face found in {n - stats['frames_with_face']} of {n} frames")
    ws.path("detect").mkdir(exist_ok=True)
    with atomic_path(ws.path(FACES_NPZ)) as tmp:
        np.savez(tmp, boxes=track.boxes, scores=track.scores, n_faces=track.n_faces)
    crop = {"box": box.as_list(), "box_format": "x, y, width, height in displayed source pixels",
            "source_size": [info.video.width, info.video.height], **stats}
    write_json(ws.path(CROP_JSON), crop)
    progress.info(f"  crop box {box.w}x{box.h} at ({box.x}, {box.y}); face in {100 * stats['face_fraction']:.1f}% of frames")
    return {k: v for k, v in crop.items() if k not in ("box_format",)}


def _frames(ws: Workspace, info: MediaInfo, timeline: dict, cfg: PreprocessConfig) -> dict:
    import cv2

    crop = CropBox(*read_json(ws.path(CROP_JSON))["box"])
    n = timeline["n_frames"]
    ext = cfg.frame_format
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if ext == "png" else [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
    # Image encoding overlaps with decoding in ffmpeg (see frameio.BackgroundWriter).
    with ws.staging_dir(FRAMES_DIR) as out, progress.bar("writing frames", n) as bar:
        with BackgroundWriter() as writer:
            for i, rgb in enumerate(iter_frames(info, cfg.fps, crop=crop, size=cfg.size, n_frames=n)):
                bgr = np.ascontiguousarray(rgb[:, :, ::-1])
                writer.submit(write_image, out / f"{i:06d}.{ext}", bgr, params)  # at most 8 behind
                bar.advance()
        write_json(out / "frames.json", {
            "n_frames": n, "fps": timeline["fps"], "width": cfg.size, "height": cfg.size, "format": ext,
            "pattern": f"%06d.{ext}", "crop_box": crop.as_list(),
            "frame_time": timeline["frame_time"],
        })
    return {"n_frames": n, "size": cfg.size, "format": ext}


def frame_paths(ws: Workspace) -> list[Path]:
    meta = read_json(ws.path(FRAMES_JSON))
    return [ws.path(FRAMES_DIR) / (meta["pattern"] % i) for i in range(meta["n_frames"])]


def _relative(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.root).as_posix()


def _landmarks(ws: Workspace, timeline: dict, cfg: PreprocessConfig) -> dict:
    from .landmarks import track

    fan = None
    if cfg.landmarks == "face-alignment":
        from .fan import FanLandmarks

        fan = FanLandmarks(cfg.landmarks_model)
    paths = frame_paths(ws)
    with quiet_native_stderr(), progress.bar("face landmarks", len(paths)) as bar:
        data = track(read_frames(paths), len(paths), bar, fan).arrays()
    n, ok = len(paths), data["ok"]
    multi, fast = int((data["n_faces"] > 1).sum()), int(data["fast"].sum())
    if ok.mean() < 0.5:
        raise InputError(f"face landmarks found in only {int(ok.sum())} of {n} frames; talkcli needs the face "
                         "visible in most frames")
    if (~ok).sum():
        progress.warn(f"no face landmarks in {int((~ok).sum())} of {n} frames")
    if multi:
        progress.warn(f"{multi} of {n} frames show more than one face; the largest is tracked")
    if fast:
        progress.warn(f"very fast head motion in {fast} of {n} frames (flagged in landmarks.npz 'fast')")
    with atomic_path(ws.path(LANDMARKS_NPZ)) as tmp:
        np.savez(tmp, backend=np.array("mediapipe"), **data)
    return {"frames_tracked": int(ok.sum()), "frames": n, "multi_face_frames": multi, "fast_motion_frames": fast}


def _matting(ws: Workspace) -> dict:
    from .matting import contact_sheet, run_matting

    paths = frame_paths(ws)
    lms = np.load(ws.path(LANDMARKS_NPZ))
    ws.path("previews").mkdir(exist_ok=True)
    with ws.staging_dir(MATTING_DIR) as out, quiet_native_stderr(), progress.bar("matting", len(paths)) as bar:
        summary = run_matting(paths, lms["points"], lms["ok"], out, bar)
        with atomic_path(ws.path(MATTING_PREVIEW)) as tmp:
            contact_sheet(paths, out, tmp)
    return summary


def _facefit(ws: Workspace, timeline: dict, cfg: PreprocessConfig) -> dict:
    from .facemodel import outputs
    from .facemodel.builtin import BuiltinFitConfig, fit_builtin

    paths = frame_paths(ws)
    lms = np.load(ws.path(LANDMARKS_NPZ))
    points, ok = lms["points"], lms["ok"]
    size = tuple(int(v) for v in lms["image_size"])
    if cfg.face_model == "flame":
        fit = _fit_flame(points, ok, size, cfg)
    else:
        fit_cfg = BuiltinFitConfig(max_components=cfg.expression_components, explained=cfg.expression_explained,
                                   pose_sigma=cfg.pose_smoothing)
        with progress.bar("face-model fit", int(ok.sum())) as bar:
            fit = fit_builtin(points, ok, size, fit_cfg, bar)
    angles = outputs.head_angles(fit.rotation)
    profile = np.abs(angles[:, 0]) > outputs.PROFILE_YAW_DEG
    train = ok & ~profile
    if profile.any():
        progress.warn(f"{int(profile.sum())} profile frames (|yaw| > {outputs.PROFILE_YAW_DEG:g}°) are kept out "
                      "of training")
    data = outputs.arrays(fit, train, angles)
    with atomic_path(ws.path(FACEFIT_NPZ)) as tmp:
        np.savez(tmp, **data)
    write_json(ws.path(TRANSFORMS_JSON), outputs.transforms(fit, train, size, timeline["fps"],
                                                            [_relative(ws, p) for p in paths]))
    ws.path("previews").mkdir(exist_ok=True)
    tris = data["triangles"] if "triangles" in data else np.zeros((0, 3), np.int64)
    with progress.bar("tracking preview", len(paths)) as bar:
        outputs.write_tracking_preview(ws.path(TRACKING_PREVIEW), paths, fit, points, tris, timeline["fps"], bar)
    q = outputs.quality(fit, points, size)
    q["profile_frames"] = int(profile.sum())
    j = q["jitter"]
    progress.info(
        f"  tracked {q['frames_tracked']}/{q['frames_total']} frames; reprojection {q['reprojection_px512_median']:.2f} px "
        f"median, {q['reprojection_px512_p95']:.2f} px p95 (at 512²); jitter {j['rotation_deg_mean']:.3f}° / "
        f"{j['translation_mm_mean']:.2f} mm per frame²"
        + (f"; {q['expression_components']} expression components explain "
           f"{100 * q['expression_variance_explained']:.1f}%" if "expression_components" in q else "")
    )
    return {"model": fit.model, "quality": q}


def _fit_flame(points: np.ndarray, ok: np.ndarray, size: tuple[int, int], cfg: PreprocessConfig):
    from .facemodel.flame import fit_flame, load_flame

    model = load_flame(*cfg.flame_files())
    with progress.bar("FLAME fit", None, unit="it"):
        return fit_flame(points, ok, size[0], model)


def _audio(ws: Workspace, info: MediaInfo, timeline: dict, cfg: PreprocessConfig) -> dict:
    from ..media.audio import aligned_audio, write_wav

    if info.audio is None:
        progress.warn("the video has no audio track: audio features are skipped and talk render will need --audio")
        _remove(ws.path(AUDIO_WAV))
        return {"has_audio": False}
    sr = cfg.sample_rate
    n_samples = int(round(timeline["n_frames"] * sr / timeline["fps"]))
    with progress.bar("extracting audio", round(n_samples / sr, 2), unit="s") as bar:
        samples = aligned_audio(info, sr, n_samples)
        bar.advance(n_samples / sr)
    ws.path("audio").mkdir(exist_ok=True)
    write_wav(ws.path(AUDIO_WAV), samples, sr)
    covered = max(0.0, min(info.audio.end, n_samples / sr) - max(0.0, info.audio.start))
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak < 1e-4:
        progress.warn("the audio track is silent")
    return {"has_audio": True, "sample_rate": sr, "samples": n_samples, "seconds": round(n_samples / sr, 4),
            "source_seconds_covered": round(covered, 4), "peak": round(peak, 4)}


def _features(ws: Workspace, timeline: dict, cfg: PreprocessConfig) -> dict:
    from ..media.audio import read_wav
    from . import audio_features

    if not ws.path(AUDIO_WAV).exists():
        _remove(ws.path(FEATURES_NPZ))
        return {"skipped": "no audio track"}
    samples, sr = read_wav(ws.path(AUDIO_WAV))
    n = timeline["n_frames"]
    with progress.bar("audio features", n) as bar:
        data = audio_features.compute(samples, sr, timeline["fps"], n, cfg, bar)
    with atomic_path(ws.path(FEATURES_NPZ)) as tmp:
        np.savez(tmp, **data)
    return {"kind": str(data["kind"]), "shape": list(data["features"].shape)}


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
