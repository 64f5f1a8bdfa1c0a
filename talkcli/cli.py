"""The ``talk`` command. Parses arguments, builds configs and calls stages; no stage logic here.

Exit codes (docs/cli.md): 0 ok, 1 bad input or failed stage, 2 usage error or a stage this version
does not provide, 3 workspace locked by another run, 4 workspace not writable or disk full,
5 optional model missing, 130 interrupted. Errors are one line on stderr; ``--debug`` adds the
traceback. ``--json`` prints a machine-readable summary on stdout (progress goes to stderr).
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional

import typer

from . import progress
from .errors import TalkError

app = typer.Typer(
    name="talk",
    help="Turn a video of one person talking into a drivable avatar, and render new talking-head videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or messages (errors still print)."),
) -> None:
    _state["debug"] = debug
    progress.set_quiet(quiet)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn failures into one line on stderr and the documented exit code."""
    try:
        yield
    except TalkError as exc:
        if _state["debug"]:
            traceback.print_exc()
        progress.console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        progress.console.print("[red]interrupted[/red]: finished stages are kept; rerun the command to continue")
        raise typer.Exit(130)
    except (typer.Exit, typer.Abort):
        raise
    except OSError as exc:
        from .errors import storage_error

        if _state["debug"]:
            traceback.print_exc()
        progress.console.print(f"[red]error:[/red] {storage_error(exc, exc.filename or 'a file')}", soft_wrap=True)
        raise typer.Exit(4)
    except Exception as exc:  # a bug: still one line unless --debug
        if _state["debug"]:
            traceback.print_exc()
        progress.console.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            soft_wrap=True)
        raise typer.Exit(1)


def _emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- preprocess


@app.command()
def preprocess(
    video: Path = typer.Argument(..., help="Video of the subject talking (any format ffmpeg reads)."),
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w",
                                             help="Workspace directory [default: ./<video name>/]."),
    size: int = typer.Option(512, "--size", help="Output frame size in pixels (square)."),
    fps: float = typer.Option(25.0, "--fps", help="Working frame rate; any input rate is resampled to it."),
    crop: str = typer.Option("auto", "--crop", help="auto (face-centred), full (centred square) or x,y,side."),
    frame_format: str = typer.Option("png", "--frame-format", help="png (lossless) or jpg."),
    audio_features: str = typer.Option("logmel", "--audio-features",
                                       help="logmel; hubert / wav2vec2 from --audio-model in a later version."),
    audio_model: Optional[Path] = typer.Option(None, "--audio-model", help="HuBERT / wav2vec2 model directory."),
    min_face_fraction: float = typer.Option(0.5, "--min-face-fraction",
                                            help="Fail when fewer frames than this show a face."),
    landmarks: str = typer.Option("mediapipe", "--landmarks",
                                  help="Who gives the iBUG 68 points: mediapipe, or face-alignment (FAN weights "
                                       "from --landmarks-model or the configured models directory)."),
    landmarks_model: Optional[Path] = typer.Option(None, "--landmarks-model",
                                                   help="FAN 2DFAN4-*.zip, or the directory that holds it."),
    face_model: str = typer.Option("builtin", "--face-model",
                                   help="builtin, or flame (from --flame, or the configured models directory)."),
    flame: Optional[Path] = typer.Option(None, "--flame", help="FLAME generic_model.pkl: fit FLAME instead of "
                                         "the built-in face model (mediapipe_landmark_embedding.npz beside it)."),
    flame_embedding: Optional[Path] = typer.Option(None, "--flame-embedding",
                                                   help="FLAME mediapipe_landmark_embedding.npz elsewhere."),
    expression_components: int = typer.Option(32, "--expression-components",
                                              help="At most this many expression components (built-in model)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage even if it is up to date."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Frames, audio, landmarks, matting and face-model fit of a video, in a per-subject workspace (cached)."""
    with _errors():
        from .config import PreprocessConfig
        from .preprocess import pipeline
        from .workspace import Workspace

        if landmarks == "face-alignment":
            from .preprocess.fan import find_fan

            landmarks_model = find_fan(landmarks_model)  # MissingModel (exit 5) before any work
        if face_model == "flame" and flame is None:
            from .models import require

            flame = require("flame") / "generic_model.pkl"
        cfg = PreprocessConfig(fps=fps, size=size, crop=crop, frame_format=frame_format,
                               audio_features=audio_features,
                               audio_model=str(audio_model) if audio_model else None,
                               min_face_fraction=min_face_fraction,
                               face_model="flame" if flame else face_model,
                               flame=str(flame.resolve()) if flame else None,
                               flame_embedding=str(flame_embedding.resolve()) if flame_embedding else None,
                               expression_components=expression_components,
                               landmarks=landmarks,
                               landmarks_model=str(landmarks_model) if landmarks_model else None).validate()
        ws = Workspace(workspace or pipeline.default_workspace(video))
        created = not ws.root.exists()
        try:
            with ws.locked(f"talk preprocess {video}"):
                summary = pipeline.run(ws, video, cfg, force=force)
        except TalkError:
            if created:  # e.g. not a media file: leave no empty workspace behind
                ws.remove_if_unused()
            raise
        if as_json:
            _emit_json(summary)
        else:
            ran = [n for n, s in summary["stages"].items() if not s["skipped"]]
            progress.info(
                f"[bold]{summary['frames']} frames[/bold] at {summary['fps']:g} fps, {summary['size']}², "
                f"in {summary['workspace']} ({'ran ' + ', '.join(ran) if ran else 'all up to date'}, "
                f"{summary['seconds']:.1f} s)"
            )


# --------------------------------------------------------------------------- status


@app.command()
def status(
    workspace: Path = typer.Argument(..., help="Workspace directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the stage table as JSON on stdout."),
) -> None:
    """Show which stages of a workspace are done, stale or missing."""
    with _errors():
        from .workspace import Workspace

        ws = Workspace(workspace)
        if not ws.root.is_dir() or not ws.is_workspace():
            raise TalkError(f"{workspace} is not a talkcli workspace (no workspace.json)")
        rows = _status_rows(ws)
        if as_json:
            _emit_json({
                "workspace": str(ws.root),
                "source": (ws.source() or {}).get("path"),
                "stages": [{"name": r.name, "state": r.state, "reason": r.reason,
                            "finished": r.record and r.record.get("started"),
                            "seconds": r.record and r.record.get("seconds")} for r in rows],
            })
            return
        from rich.table import Table

        colour = {"done": "green", "stale": "yellow", "missing": "red"}
        table = Table(title=str(ws.root), title_justify="left")
        for col in ("stage", "state", "why", "made", "seconds"):
            table.add_column(col)
        for r in rows:
            table.add_row(r.name, f"[{colour[r.state]}]{r.state}[/]", r.reason,
                          (r.record or {}).get("started", ""),
                          f"{r.record['seconds']:.1f}" if r.record else "")
        progress.console.print(table)


def _status_rows(ws) -> list:
    """The stage table; when no run holds the workspace and it is writable, outputs verified by
    content after a copy get their new stamps recorded (so the next check is quick)."""
    from .errors import StorageError, WorkspaceLocked

    try:
        with ws.locked("talk status"):
            return ws.status()
    except (WorkspaceLocked, StorageError):
        return ws.status()


# --------------------------------------------------------------------------- info


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout.")) -> None:
    """Versions, compute device, native kernels and optional models."""
    with _errors():
        from .info import collect

        data = collect()
        if as_json:
            _emit_json(data)
            return
        c = progress.console
        c.print(f"[bold]talkcli {data['talkcli']}[/bold]  python {data['python']}  ({data['platform']})")
        c.print("packages: " + ", ".join(f"{k} {v}" for k, v in data["packages"].items()))
        c.print(f"ffmpeg:   {data['ffmpeg']['version']} ({data['ffmpeg']['path']})")
        d = data["device"]
        c.print(f"cpu:      {d['cpu_count']} cores, torch uses {d['torch_threads']} threads")
        c.print(f"cuda:     {d['cuda'] or 'none'}")
        k = data["native_kernels"]
        c.print(f"kernels:  backend {k['backend']} (TALKCLI_KERNELS); cpu: {k['cpu']}; cuda: {k['cuda']} "
                f"(C++ compiler: {k['cxx'] or 'none'}, nvcc: {k['nvcc'] or 'none'})")
        c.print(f"models:   optional, in {data['models_root']}")
        for name, m in data["optional_models"].items():
            mark = "[green]✓[/green]" if m["configured"] else "-"
            c.print(f"  {mark} {name:<15} {m['detail']}")


# --------------------------------------------------------------------------- train / eval


def _default_preset(model: str = "r2talker") -> str:
    import torch

    return f"{model}-paper" if torch.cuda.is_available() else f"{model}-cpu"


def _check_model(model: str) -> None:
    from .errors import UsageError
    from .train import AVATARS

    if model not in AVATARS:
        raise UsageError(f"--model {model}: choose one of {', '.join(AVATARS)}")


@app.command()
def train(
    workspace: Path = typer.Argument(..., help="A workspace made by `talk preprocess`."),
    model: str = typer.Option("r2talker", "--model", help="Avatar model: r2talker or meshhash."),
    preset: Optional[str] = typer.Option(None, "--preset",
                                         help="Preset name (presets/*.toml) or path [default: MODEL-paper "
                                              "with a GPU, MODEL-cpu without]."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset field: section.field=value "
                                   "(e.g. train.iterations=2000). Repeatable."),
    force: bool = typer.Option(False, "--force", help="Train from scratch even if a model or checkpoint exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train the avatar of a preprocessed workspace (resumes an interrupted run)."""
    with _errors():
        from .avatar.config import load_preset
        from .avatar.data import check_preprocessed
        from .errors import UsageError
        from .workspace import Workspace

        _check_model(model)
        cfg = load_preset(preset or _default_preset(model), tuple(set_))
        if cfg.avatar != model:
            raise UsageError(f"preset {cfg.name} is a {cfg.avatar} preset; give --model {cfg.avatar} or a {model} preset")
        ws = Workspace(workspace)
        check_preprocessed(ws)
        from . import train as train_stage

        with ws.locked(f"talk train {workspace}"):
            summary = train_stage.run(ws, cfg, force=force)
            if ws.path("audio/features.npz").is_file():  # the audio -> motion model of this subject
                from .motion import stage as motion_stage

                summary["motion"] = motion_stage.run(ws, cfg.train.holdout_fraction, force=force)
            else:
                progress.warn("the video has no sound: no audio-to-motion model (drive it with --expressions "
                              "or --from)")
        if as_json:
            _emit_json(summary)
        elif summary["skipped"]:
            progress.info(f"the {cfg.name} avatar in {summary['model']} is up to date (--force to retrain)")
        else:
            progress.info(f"[bold]trained[/bold] {summary['model']} ({cfg.name}, {summary['iterations']} iterations, "
                          f"{summary['seconds']:.0f} s): held-out PSNR {summary.get('holdout_psnr', 'n/a')} dB; "
                          f"log and images in {Path(summary['model']).parent}")


@app.command("eval")
def eval_(
    workspace: Path = typer.Argument(..., help="A workspace with a trained avatar."),
    model: list[str] = typer.Option([], "--model", help="Avatar(s) to evaluate [default: every trained one]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Measure the avatars on held-out frames (PSNR, SSIM, LMD, FPS, GFLOPs) beside a retrieval baseline."""
    with _errors():
        from .avatar.data import check_preprocessed
        from .workspace import Workspace

        ws = Workspace(workspace)
        check_preprocessed(ws)
        from . import evaluate

        for m in model:
            _check_model(m)
        with ws.locked(f"talk eval {workspace}"):
            result = evaluate.run(ws, model or None)
        if as_json:
            _emit_json({k: v for k, v in result.items() if k != "per_frame"})
            return
        from rich.table import Table

        table = Table(title=f"held-out frames {result['holdout_frames'][0]}-{result['holdout_frames'][1]} at "
                            f"{result['size']}² ({result['preset']})", title_justify="left")
        for col in ("method", "PSNR dB", "SSIM", "LMD mouth px", "LMD face px", "FPS", "GFLOPs/frame"):
            table.add_column(col)
        for name, m in result["metrics"].items():
            table.add_row(name, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['lmd_mouth']:.2f}",
                          f"{m['lmd_face']:.2f}", f"{m['fps']:.1f} ({m['fps_512']:.2f} at 512²)" if "fps" in m else "",
                          f"{m['gflops']:.3f}" if "gflops" in m else "")
        progress.console.print(table)
        progress.info(f"LPIPS: {result['lpips']}; images: {result['samples']}")


# --------------------------------------------------------------------------- drive / render


def _drive_args(workspace: Path, audio, expressions, from_, motion_model, pose, blinks, seed, motion_gain) -> dict:
    from .workspace import Workspace

    return dict(audio=audio, expressions=expressions, source_ws=Workspace(from_) if from_ else None,
                motion_model=motion_model, pose=pose, blinks=blinks, seed=seed, motion_gain=motion_gain)


_AUDIO_HELP = "Speech to drive the avatar (any file ffmpeg reads); its sound is muxed into the video."
_EXPR_HELP = "Per-frame landmarks or expression coefficients (.csv / .npz, docs/cli.md)."
_FROM_HELP = "Another workspace: its tracked expressions drive this subject (cross-reenactment)."
_POSE_HELP = "Head pose: still (mean), loop (training poses forward and back) or source (the source's)."
_GAIN_HELP = ("Scale of the motion predicted from --audio about the subject's mean face, on top of the gain "
              "training chose: the model predicts the expected mouth, which moves less than a real one "
              "(models/motion/eval.json compares the opening std with the tracked one).")


@app.command()
def drive(
    workspace: Path = typer.Argument(..., help="A workspace with a trained avatar."),
    audio: Optional[Path] = typer.Option(None, "--audio", help=_AUDIO_HELP),
    expressions: Optional[Path] = typer.Option(None, "--expressions", help=_EXPR_HELP),
    from_: Optional[Path] = typer.Option(None, "--from", help=_FROM_HELP),
    motion_model: Optional[Path] = typer.Option(None, "--motion-model",
                                                help="A general model from `talk train-motion` instead of the "
                                                     "subject's own."),
    pose: str = typer.Option("loop", "--pose", help=_POSE_HELP),
    blinks: bool = typer.Option(True, "--blinks/--no-blinks", help="Add natural blinks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the blink timing."),
    motion_gain: float = typer.Option(1.0, "--motion-gain", help=_GAIN_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Track file [default: tracks/<name>.npz]."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Make a motion track (landmarks, head pose, blinks) from speech, expressions or another subject."""
    with _errors():
        from . import drive as drive_stage
        from .workspace import Workspace

        from .avatar.data import check_preprocessed

        ws = Workspace(workspace)
        check_preprocessed(ws)
        args = _drive_args(workspace, audio, expressions, from_, motion_model, pose, blinks, seed, motion_gain)
        with ws.locked(f"talk drive {workspace}"):
            summary = drive_stage.run(ws, output, **args)
        if as_json:
            _emit_json(summary)
        else:
            progress.info(f"track of {summary['frames']} frames ({summary['seconds']:.2f} s) from {summary['source']} "
                          f"in {summary['track']}")


@app.command()
def render(
    workspace: Path = typer.Argument(..., help="A workspace with a trained avatar."),
    audio: Optional[Path] = typer.Option(None, "--audio", help=_AUDIO_HELP),
    expressions: Optional[Path] = typer.Option(None, "--expressions", help=_EXPR_HELP),
    from_: Optional[Path] = typer.Option(None, "--from", help=_FROM_HELP),
    track: Optional[Path] = typer.Option(None, "--track", help="A track from `talk drive` instead of a source."),
    motion_model: Optional[Path] = typer.Option(None, "--motion-model", help="A general motion model."),
    pose: str = typer.Option("loop", "--pose", help=_POSE_HELP),
    blinks: bool = typer.Option(True, "--blinks/--no-blinks", help="Add natural blinks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the blink timing."),
    motion_gain: float = typer.Option(1.0, "--motion-gain", help=_GAIN_HELP),
    background: str = typer.Option("plate", "--background",
                                   help="plate (head + torso over the background plate) or source (paste the face "
                                        "into the subject's own frames: dubbing)."),
    size: Optional[int] = typer.Option(None, "--size", help="Output size in pixels [default: the training size]."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (0-51, lower is better)."),
    model: Optional[str] = typer.Option(None, "--model", help="Which trained avatar renders: r2talker or meshhash "
                                        "[default: r2talker, or the only one trained]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="MP4 to write [default: renders/<name>.mp4]."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Render an MP4 of the subject saying the audio (or following the expressions), sound muxed in sync."""
    with _errors():
        from . import drive as drive_stage
        from . import render as render_stage
        from .avatar.data import check_preprocessed
        from .errors import UsageError
        from .train import model_file, trained_avatars
        from .workspace import Workspace

        ws = Workspace(workspace)
        check_preprocessed(ws)
        if model is None:  # the only trained avatar, else R2-Talker
            trained = trained_avatars(ws)
            model = trained[0] if len(trained) == 1 else "r2talker"
        _check_model(model)
        if not ws.path(model_file(model)).is_file():
            flag = "" if model == "r2talker" else f" --model {model}"
            raise TalkError(f"no trained {model} avatar in {workspace}; run `talk train {workspace}{flag}` first")
        if output is not None and output.suffix.lower() != ".mp4":
            raise UsageError(f"-o {output}: the output is an .mp4 file")
        with ws.locked(f"talk render {workspace}"):
            if track is not None:
                if any(x is not None for x in (audio, expressions, from_)) or motion_gain != 1:
                    raise UsageError("--track already holds the motion: leave out --audio/--expressions/--from "
                                     "and --motion-gain")
                trk = drive_stage.Track.load(track)
            else:
                trk = drive_stage.make_track(ws, **_drive_args(workspace, audio, expressions, from_, motion_model,
                                                               pose, blinks, seed, motion_gain))
            name = drive_stage._track_name({"audio": audio, "expressions": expressions,
                                            "source_ws": Workspace(from_) if from_ else None}) if track is None \
                else track.stem
            out = output or ws.path(f"renders/{name}.mp4")
            summary = render_stage.run(ws, trk, out, size=size, crf=crf, background=background, model_kind=model)
        if as_json:
            _emit_json(summary)
        else:
            progress.info(f"[bold]{summary['output']}[/bold]: {summary['frames']} frames, {summary['duration']:.2f} s "
                          f"at {summary['fps']:g} fps, {summary['size']}², rendered at {summary['fps_achieved']:.1f} "
                          f"frames/s{'' if summary['has_audio'] else ' (no sound)'}")
            sys.stdout.write(summary["output"] + "\n")


@app.command("train-motion")
def train_motion(
    workspaces: list[Path] = typer.Argument(..., help="Preprocessed workspaces of people speaking."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the general motion model (.pt)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train a general audio-to-motion model across workspaces (use it with --motion-model)."""
    with _errors():
        from .avatar.data import check_preprocessed
        from .motion import stage as motion_stage
        from .workspace import Workspace

        spaces = [Workspace(w) for w in workspaces]
        for ws in spaces:
            check_preprocessed(ws)
        with contextlib.ExitStack() as held:  # no preprocess may redo what is being read
            for ws in spaces:
                held.enter_context(ws.locked(f"talk train-motion {ws.root}"))
            summary = motion_stage.train_general(spaces, output)
        if as_json:
            _emit_json(summary)
        else:
            progress.info(f"general motion model from {len(workspaces)} workspaces in {output}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
