"""``talk drive``: a motion track for the subject from speech, an expression file or another
subject. The track is what ``talk render`` renders:

    tracks/<name>.npz   landmarks (T, 68, 3) in the subject's head frame (metres), rotation (T, 3, 3),
                        translation (T, 3), fps, seconds (the audio's length; T = round(seconds * fps)),
                        audio (path of the sound to mux, '' for none), source (what drove it), pose,
                        mesh (T, 478, 3): the whole face mesh (for the meshhash avatar; optional)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import progress
from .artifacts import NPZ_ERRORS, workspace_npz
from .errors import InputError, UsageError
from .workspace import Workspace, atomic_path, read_json

POSE_MODES = ("still", "loop", "source")


@dataclass
class Track:
    landmarks: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    fps: float
    seconds: float
    audio: str
    source: str
    pose: str
    mesh: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.landmarks.shape[0])

    def meshes(self, ws: Workspace) -> np.ndarray:
        """(T, 478, 3) face meshes: the track's own, or fitted to its landmarks by the subject's
        face model (``motion.mesh``)."""
        if self.mesh is None:
            from .motion.mesh import mesh_from_landmarks

            self.mesh = mesh_from_landmarks(ws, self.landmarks)
        return self.mesh

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, landmarks=self.landmarks, rotation=self.rotation, translation=self.translation,
                     fps=np.float64(self.fps), seconds=np.float64(self.seconds), audio=np.array(self.audio),
                     source=np.array(self.source), pose=np.array(self.pose),
                     **({"mesh": self.mesh} if self.mesh is not None else {}))

    @classmethod
    def load(cls, path: Path) -> "Track":
        if not Path(path).is_file():
            raise InputError(f"--track {path}: no such file")
        try:
            d = np.load(path)
            return cls(d["landmarks"], d["rotation"], d["translation"], float(d["fps"]), float(d["seconds"]),
                       str(d["audio"]), str(d["source"]), str(d["pose"]), d["mesh"] if "mesh" in d else None)
        except NPZ_ERRORS as exc:  # a truncated file too: its arrays are read here
            raise InputError(f"--track {Path(path).name} is not a talkcli track or is damaged "
                             f"({type(exc).__name__}: {exc})") from None


def _subject(ws: Workspace):
    """The subject's tracked landmarks, poses, usable frames, neutral shape and face scale."""
    from .avatar.data import check_preprocessed
    from .motion.audio2motion import face_scale
    from .avatar.data import subject_landmarks

    check_preprocessed(ws)
    lmk, ok = subject_landmarks(ws)
    fit = workspace_npz(ws, "facefit.npz")
    frames = np.flatnonzero(ok)
    fps = float(read_json(ws.path("frames/frames.json"))["fps"])  # the working rate every stage uses
    return lmk, fit["rotation"].astype(np.float32), fit["translation"].astype(np.float32), frames, \
        lmk[frames].mean(0), face_scale(lmk[frames]), fps


def make_track(ws: Workspace, *, audio: Path | None = None, expressions: Path | None = None,
               source_ws: Workspace | None = None, motion_model: Path | None = None, pose: str = "loop",
               blinks: bool = True, seed: int = 0, motion_gain: float = 1.0) -> Track:
    from .motion import pose as posemod
    from .motion import sources

    if pose not in POSE_MODES:
        raise UsageError(f"--pose must be one of {', '.join(POSE_MODES)}")
    given = [x for x in (audio, expressions, source_ws) if x is not None]
    if expressions is not None and source_ws is not None:
        raise UsageError("give one driving source: --expressions or --from (--audio may go with either)")
    if not given:
        raise UsageError("give a driving source: --audio FILE, --expressions FILE or --from WORKSPACE")
    if not 0 < motion_gain <= 4:
        raise UsageError(f"--motion-gain {motion_gain}: use a scale in (0, 4]")
    if motion_gain != 1 and (expressions is not None or source_ws is not None):
        raise UsageError("--motion-gain scales the motion predicted from speech: use it with --audio alone")
    lmk, rot, tr, frames, neutral, scale, fps = _subject(ws)
    pose_rot, pose_tr, pose_frames = rot, tr, frames
    sound = ""
    if expressions is not None or source_ws is not None:
        if expressions is not None:
            offsets = sources.read_expressions(expressions, ws)
            what = f"expressions {Path(expressions).name}"
        else:
            offsets, o_rot, o_tr, o_wav = sources.from_workspace(source_ws)
            what = f"workspace {source_ws.root.name}"
            if pose == "source":
                pose_rot, pose_tr, pose_frames = o_rot.astype(np.float32), o_tr.astype(np.float32), np.arange(len(o_rot))
            if audio is None and o_wav is not None:
                audio = o_wav
        seconds = len(offsets) / fps
        if audio is not None:  # the sound sets the length: the expressions are cut or held
            _, n_audio = sources.load_speech(audio, 16000, fps)
            idx = np.minimum(np.arange(n_audio), len(offsets) - 1)
            offsets, seconds = offsets[idx], n_audio / fps
            sound = str(Path(audio).resolve())
    else:
        from .motion import stage as motion_stage

        path = Path(motion_model) if motion_model else ws.path(motion_stage.MOTION_FILE)
        model = motion_stage.load(path)
        feats, seconds = sources.audio_features(audio, fps, visemes="visemes" in model.sources)
        # the model predicts the expected motion, which moves less than a real mouth: the user's
        # gain scales it about the subject's mean face (on top of the gain training chose)
        offsets = model.predict_offsets(feats) * np.float32(motion_gain)
        what = f"audio {Path(audio).name}"
        sound = str(Path(audio).resolve())
    n = len(offsets)
    if blinks:
        offsets = posemod.add_blinks(offsets, posemod.blink_shape(lmk[frames], scale), fps, seed)
    landmarks = (neutral + offsets * scale).astype(np.float32)
    r, t = posemod.poses(pose, n, pose_rot, pose_tr, pose_frames)
    if not sound:
        progress.warn("no sound for this track: the video will be silent (give --audio)")
    mesh = None
    if source_ws is not None:  # per-vertex transfer of the other subject's expressions, frame for frame
        from .motion.mesh import transfer_mesh

        src_mesh = transfer_mesh(ws, source_ws, scale)
        mesh = src_mesh[np.minimum(np.arange(n), len(src_mesh) - 1)]
    return Track(landmarks, r, t, fps, float(seconds), sound, what, pose, mesh)


def run(ws: Workspace, out: Path | None, **kwargs) -> dict:
    track = make_track(ws, **kwargs)
    path = Path(out) if out else ws.path(f"tracks/{_track_name(kwargs)}.npz")
    track.save(path)
    return {"track": str(path), "frames": track.n_frames, "fps": track.fps, "seconds": round(track.seconds, 3),
            "source": track.source, "pose": track.pose, "audio": track.audio or None}


def _track_name(kwargs: dict) -> str:
    for key in ("audio", "expressions"):
        if kwargs.get(key) is not None:
            return Path(kwargs[key]).stem
    if kwargs.get("source_ws") is not None:
        return f"from-{kwargs['source_ws'].root.name}"
    return "track"
