"""``talk train``: an R2-Talker avatar from a preprocessed workspace (resumable).

    workspace (frames, matting, landmarks, facefit) --load_subject--> SubjectData
      --head phase (iterations)--> landmark encoder + head NeRF + occupancy grid
      --torso phase (torso_iterations)--> torso, head frozen
      --> models/r2talker/model.pt, config.json, train_log.csv, loss.png, val/*.png

The head phase follows the paper's schedule (Sec. 3.4) scaled to the preset's iteration count:
progressive hash levels, learning rate x0.1 and x0.01 at 62.5% and 75%, lips fine-tuning from
83.3% with the learning rate reset. A checkpoint is written atomically every
``checkpoint_every`` iterations and on Ctrl-C; rerunning ``talk train`` continues from it when
the preset and the workspace are unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, progress
from .artifacts import from_saved, load_torch, to_saved
from .avatar.config import Preset, preset_from_dict
from .avatar.data import HEAD, TORSO, SubjectData, head_aabb, landmark_box, load_subject, windows
from .avatar.lpips import at_least_64, load_lpips
from .avatar.metrics import psnr, ssim_map
from .avatar.r2talker import R2Talker
from .avatar.render import render_frame, render_rays
from .avatar.torso import pose_vector
from .errors import InputError
from .ops import _native
from .workspace import Workspace, atomic_path, run_stage, write_json, write_torch

MODEL_DIR = "models/r2talker"
MODEL_FILE = f"{MODEL_DIR}/model.pt"
CHECKPOINT = f"{MODEL_DIR}/checkpoint.pt"
CODE_VERSION = 1
AVATARS = ("r2talker", "meshhash")


def model_file(kind: str) -> str:
    """Where the trained avatar of a model kind lives in a workspace."""
    return f"models/{kind}/model.pt"


def trained_avatars(ws: Workspace) -> list[str]:
    """The model kinds with a trained avatar in ``ws``, in ``AVATARS`` order."""
    return [k for k in AVATARS if ws.path(model_file(k)).is_file()]
UPSTREAM = ("frames", "landmarks", "matting", "facefit")
LOG_FIELDS = ("iteration", "phase", "loss", "psnr", "lr", "levels", "samples_per_ray", "occupied", "seconds")


# --------------------------------------------------------------------------- model I/O


def build_model(preset: Preset, data: SubjectData, train_idx: np.ndarray) -> R2Talker:
    lmk = data.landmarks[train_idx]
    poses = pose_vector(data.rotation[train_idx], data.translation[train_idx])
    return R2Talker(preset.model, head_aabb(lmk), landmark_box(data.landmarks), poses.mean(axis=0), data.size)


def save_model(path: Path, model, preset: Preset, extra: dict) -> None:
    """model.pt or checkpoint.pt: tensors and Python values only (numpy arrays in ``extra`` become
    tensors), so that ``load_model`` unpickles it with ``weights_only``."""
    payload = {"format": 1, "talkcli": __version__, "preset": preset.to_dict(), "avatar": preset.avatar,
               "aabb": to_saved(model.aabb), "size": model.size, "state": model.state_dict(), **to_saved(extra)}
    write_torch(path, payload)


def train_again(path: Path) -> str:
    """The command that writes the avatar file ``path`` (models/<kind>/*.pt) again."""
    kind = path.parent.name
    flag = "" if kind == "r2talker" else f" --model {kind}"
    return f"talk train {path.parent.parent.parent}{flag} --force"


def read_payload(path: Path) -> dict:
    """What ``save_model`` wrote to ``path``; a damaged or foreign file is an InputError."""
    payload = load_torch(path, train_again(path))
    if not isinstance(payload, dict) or not {"preset", "state", "aabb", "size"} <= payload.keys():
        raise InputError(f"{path} is not a talkcli avatar; run `{train_again(path)}` again")
    return payload


def load_model(path: Path):
    """The trained avatar in ``path`` (model.pt); errors say what to run when it is missing."""
    if not path.is_file():
        kind = path.parent.name
        flag = "" if kind == "r2talker" else f" --model {kind}"
        raise InputError(f"no trained {kind} avatar at {path}; run `talk train {path.parent.parent.parent}{flag}` first")
    payload = read_payload(path)
    preset = preset_from_dict(payload["preset"])
    state = payload["state"]
    try:
        if payload.get("avatar", "r2talker") == "meshhash":
            from .avatar.meshhash import MeshHashAvatar

            model = MeshHashAvatar.from_init(preset.model, tuple(payload["aabb"]), from_saved(payload["init"]),
                                             state["torso.pose_mean"].numpy(), int(payload["size"]))
        else:
            lmk_box = (state["lmk_lo"].numpy(), state["lmk_hi"].numpy())
            model = R2Talker(preset.model, tuple(payload["aabb"]), lmk_box, state["torso.pose_mean"].numpy(),
                             int(payload["size"]))
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:  # tensors missing or of other shapes than the preset's
        raise InputError(f"{path} does not hold a complete avatar ({type(exc).__name__}); "
                         f"run `{train_again(path)}` again") from None
    model.eval()
    return model, preset, payload


# --------------------------------------------------------------------------- ray batches


class RaySampler:
    """Pixels of a few frames per iteration: uniform, oversampled inside the head box, or a lip
    patch (lips fine-tuning)."""

    def __init__(self, data: SubjectData, train_idx: np.ndarray, seed: int):
        self.data = data
        self.train_idx = train_idx
        self.rng = np.random.default_rng(seed)

    def frames(self, count: int) -> np.ndarray:
        return self.rng.choice(self.train_idx, size=count, replace=len(self.train_idx) < count)

    def pixels(self, frame: int, count: int, head_fraction: float, mouth_fraction: float = 0.0,
               mouth_side: int = 0) -> tuple[np.ndarray, np.ndarray]:
        s = self.data.size
        n_mouth = int(round(count * mouth_fraction)) if mouth_side else 0
        n_head = int(round(count * head_fraction))
        x0, y0, x1, y1 = self.data.head_box[frame]
        cx, cy = self.data.mouth_center[frame]
        mx0, my0 = int(np.clip(cx - mouth_side / 2, 0, s - 1)), int(np.clip(cy - mouth_side / 2, 0, s - 1))
        mx1, my1 = min(s, mx0 + mouth_side), min(s, my0 + mouth_side)
        rest = count - n_head - n_mouth
        u = np.concatenate([self.rng.integers(x0, x1, n_head), self.rng.integers(mx0, max(mx1, mx0 + 1), n_mouth),
                            self.rng.integers(0, s, rest)])
        v = np.concatenate([self.rng.integers(y0, y1, n_head), self.rng.integers(my0, max(my1, my0 + 1), n_mouth),
                            self.rng.integers(0, s, rest)])
        return u, v

    def patch(self, frame: int, side: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.data.size
        cx, cy = self.data.mouth_center[frame]
        x0 = int(np.clip(round(cx - side / 2) + self.rng.integers(-side // 8, side // 8 + 1), 0, s - side))
        y0 = int(np.clip(round(cy - side / 2) + self.rng.integers(-side // 8, side // 8 + 1), 0, s - side))
        vv, uu = np.mgrid[y0:y0 + side, x0:x0 + side]
        return uu.reshape(-1), vv.reshape(-1)


# --------------------------------------------------------------------------- the trainer


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    seconds: float = 0.0


class Trainer:
    kind = "r2talker"
    betas = (0.9, 0.99)
    fused = False  # torch's fused CPU Adam: one pass over the parameters instead of a dozen

    def __init__(self, ws: Workspace, preset: Preset, data: SubjectData, train_idx: np.ndarray,
                 hold_idx: np.ndarray, upstream: dict):
        t = preset.train
        self.ws, self.preset, self.data = ws, preset, data
        self.train_idx, self.hold_idx = train_idx, hold_idx
        self.upstream = upstream
        torch.manual_seed(t.seed)
        self.model = self.make_model()
        self.head_opt = torch.optim.AdamW(self._head_groups(), betas=self.betas, eps=1e-15,
                                          weight_decay=t.weight_decay, fused=self.fused or None)
        self.torso_opt = torch.optim.AdamW(self._torso_groups(), betas=self.betas, eps=1e-15,
                                           weight_decay=t.weight_decay, fused=self.fused or None)
        self.sampler = RaySampler(data, train_idx, t.seed)
        self.state = TrainState()
        self.gen = torch.Generator().manual_seed(t.seed + 1)
        self.out = ws.path(f"models/{self.kind}")
        self.log_rows: list[dict] = []
        self.setup()
        # tensors used every iteration
        self.images = data.images  # uint8, indexed per batch
        self.bg = torch.from_numpy(data.background)
        self.rot = torch.from_numpy(data.rotation)
        self.tr = torch.from_numpy(data.translation)
        self.poses = torch.from_numpy(pose_vector(data.rotation, data.translation))
        self.lmk = torch.from_numpy(data.landmarks)

    def make_model(self):
        return build_model(self.preset, self.data, self.train_idx)

    def setup(self) -> None:
        """Model-specific state: R2-Talker's lips fine-tuning and its LPIPS network."""
        t = self.preset.train
        self.lips_patch = min(t.lips_patch, self.data.size)
        self.mouth_rays = (t.mouth_ray_fraction, self.lips_patch)  # share of rays in the lip patch, its side
        self.lpips = load_lpips() if t.lips_start < 1.0 else None
        if t.lips_start < 1.0:
            progress.info("lips fine-tuning: " + ("MSE + LPIPS on lip patches" if self.lpips is not None else
                          "no LPIPS weights configured (talk info), so MSE + (1 - SSIM) on lip patches stands in"))

    @property
    def table_lr(self) -> float:
        return self.preset.train.lr

    @property
    def net_lr(self) -> float:
        return self.preset.train.lr_net

    def _groups(self, tables: list, others: list, extra: tuple[tuple[list, float], ...] = ()) -> list[dict]:
        """Adam parameter groups: hash tables (``table_lr``, no weight decay), the networks among
        ``others`` (``net_lr``; tables are left out of them), and any (params, lr) in ``extra``."""
        skip = {id(p) for p in tables}
        for params, _ in extra:
            skip.update(id(p) for p in params)
        nets = [p for p in others if id(p) not in skip]
        groups = [{"params": tables, "lr": self.table_lr, "base_lr": self.table_lr, "weight_decay": 0.0},
                  {"params": nets, "lr": self.net_lr, "base_lr": self.net_lr}]
        return groups + [{"params": params, "lr": lr, "base_lr": lr} for params, lr in extra if params]

    def _head_groups(self) -> list[dict]:
        m = self.model
        tables = [m.encoder.grid.table] if hasattr(m.encoder, "grid") else []
        tables.append(m.head.grid.table)
        return self._groups(tables, list(m.encoder.parameters()) + list(m.head.parameters()))

    def _torso_groups(self) -> list[dict]:
        m = self.model.torso
        return self._groups([m.grid.table], list(m.parameters()))

    # ---- schedule

    @property
    def total(self) -> int:
        t = self.preset.train
        return t.iterations + t.torso_iterations

    def lr_factor(self, it: int) -> float:
        t = self.preset.train
        if it >= t.iterations:  # torso phase: its own x0.1 / x0.01 schedule
            frac = (it - t.iterations) / max(1, t.torso_iterations)
        else:
            frac = it / t.iterations
            if frac >= t.lips_start:  # lips fine-tuning: learning rate reset
                return 1.0
        drops = sorted(t.lr_drops)
        return 0.1 ** sum(frac >= d for d in drops)

    def in_lips(self, it: int) -> bool:
        t = self.preset.train
        return t.lips_start < 1.0 and t.lips_start * t.iterations <= it < t.iterations

    # ---- checkpoints

    def checkpoint_payload(self) -> dict:
        return {"iteration": self.state.iteration, "seconds": self.state.seconds,
                "head_opt": self.head_opt.state_dict(), "torso_opt": self.torso_opt.state_dict(),
                "upstream": self.upstream, "rng": self.sampler.rng.bit_generator.state,
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "log": self.log_rows}

    def model_extra(self) -> dict:
        """What ``load_model`` needs besides the state dict to rebuild the model."""
        return {}

    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_model(self.out / "checkpoint.pt", self.model, self.preset,
                   {**self.model_extra(), **self.checkpoint_payload()})

    def try_resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            return False
        try:
            payload = read_payload(path)
        except InputError:  # damaged, or a pickle that would run code: ignored, never loaded
            progress.warn(f"{path} is damaged or not a talkcli checkpoint; training from the start")
            return False
        if payload.get("preset") != self.preset.to_dict() or payload.get("upstream") != self.upstream:
            progress.warn("the checkpoint was made with another preset or from other preprocess outputs; "
                          "training from the start")
            return False
        try:
            self.model.load_state_dict(payload["state"])
        except RuntimeError:  # the model's shape depends on the anchors it was built with
            progress.warn("the checkpoint does not fit this model; training from the start")
            return False
        self.head_opt.load_state_dict(payload["head_opt"])
        self.torso_opt.load_state_dict(payload["torso_opt"])
        self.sampler.rng.bit_generator.state = payload["rng"]
        self.gen.set_state(payload["gen"])
        torch.set_rng_state(payload["torch_rng"])
        self.state = TrainState(payload["iteration"], payload["seconds"])
        self.log_rows = payload["log"]
        progress.info(f"resuming from iteration {self.state.iteration} of {self.total}")
        return True

    # ---- one iteration

    def _set_lr(self, opt: torch.optim.Optimizer, factor: float) -> float:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        return opt.param_groups[-1]["lr"]

    def _batch(self, frames: np.ndarray, lips: bool, torso: bool):
        t = self.preset.train
        us, vs, idx = [], [], []
        per = max(1, t.rays // len(frames))
        for b, f in enumerate(frames):
            if lips:
                u, v = self.sampler.patch(f, self.lips_patch)
            elif torso:
                u, v = self.sampler.pixels(f, per, 0.0)
            else:
                u, v = self.sampler.pixels(f, per, t.head_ray_fraction, *self.mouth_rays)
            us.append(u)
            vs.append(v)
            idx.append(np.full(len(u), b))
        u, v, index = (np.concatenate(a) for a in (us, vs, idx))
        fr = frames[index]
        pix = self.images[fr, v, u].astype(np.float32) / 255.0
        labels = self.data.labels[fr, v, u]
        bg = self.data.background[v, u]
        if not torso:  # head phase: everything but the head shows the background plate
            pix = np.where((labels == HEAD)[:, None], pix, bg)
        return (torch.from_numpy(u.astype(np.float32)), torch.from_numpy(v.astype(np.float32)),
                torch.from_numpy(index), torch.from_numpy(fr), torch.from_numpy(pix), torch.from_numpy(bg),
                torch.from_numpy(labels))

    def _conditions(self, frames: np.ndarray) -> torch.Tensor:
        win = windows(self.data.n_frames, frames, self.preset.model.window)
        return self.model.condition(self.lmk[torch.from_numpy(win)])

    def step(self, it: int) -> dict:
        t = self.preset.train
        torso = it >= t.iterations
        lips = not torso and self.in_lips(it)
        n_frames = 1 if lips else t.frames_per_batch
        if lips:  # a few lip patches per iteration, each a whole P x P image for the SSIM term
            n_frames = max(1, t.rays // (self.lips_patch ** 2))
        frames = self.sampler.frames(n_frames)
        u, v, index, fr, gt, bg, labels = self._batch(frames, lips, torso)
        jitter = torch.rand(u.shape[0], generator=self.gen)
        opt = self.torso_opt if torso else self.head_opt
        lr = self._set_lr(opt, self.lr_factor(it))
        if torso:
            with torch.no_grad():
                cond = self._conditions(frames)
            res = self._render(u, v, index, fr, cond, bg, jitter, torso=True, head_grad=False)
            loss = ((res.rgb - gt) ** 2).mean()
            keep = labels != HEAD  # under the head the torso's alpha is not seen
            target = (labels == TORSO).float()
            a = res.torso_alpha.clamp(1e-5, 1 - 1e-5)
            bce = -(target * a.log() + (1 - target) * (1 - a).log())
            loss = loss + 0.01 * (bce * keep).sum() / keep.sum().clamp_min(1)
        else:
            loss, res = self.head_loss(it, frames, (u, v, index, fr, gt, bg), jitter, lips)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            mse = float(((res.rgb - gt) ** 2).mean())
        return {"loss": float(loss.detach()), "psnr": -10 * math.log10(max(mse, 1e-10)), "lr": lr,
                "phase": "torso" if torso else ("lips" if lips else "head"),
                "samples_per_ray": res.samples / max(1, u.shape[0])}

    def head_loss(self, it: int, frames: np.ndarray, batch: tuple, jitter: torch.Tensor, lips: bool):
        """The head phase's loss (and the rendered rays) for one batch: photometric MSE, plus the
        lips term on lip patches."""
        t = self.preset.train
        u, v, index, fr, gt, bg = batch
        self.model.set_progress(it, t.iterations, t.progressive_every)
        cond = self._conditions(frames)
        res = self._render(u, v, index, fr, cond, bg, jitter, torso=False, head_grad=True)
        loss = ((res.rgb - gt) ** 2).mean()
        if lips:
            p = self.lips_patch
            n = len(frames)
            pred = res.rgb.reshape(n, p, p, 3).permute(0, 3, 1, 2)
            ref = gt.reshape(n, p, p, 3).permute(0, 3, 1, 2)
            if self.lpips is not None:
                loss = loss + t.lpips_weight * self.lpips(*at_least_64(pred, ref)).mean()
            elif p >= 11:  # without LPIPS weights (not bundled): 1 - SSIM stands in (docs/avatar.md)
                loss = loss + t.lpips_weight * (1 - ssim_map(pred, ref).mean())
        return loss, res

    def _render(self, u, v, index, fr, cond, bg, jitter, torso: bool, head_grad: bool):
        m = self.model
        d = self.data
        pose = self.poses[fr] if torso else None
        if head_grad:
            return render_rays(m, self.rot[fr], self.tr[fr], u, v, d.focal, d.cx, d.cy, cond, index, bg, pose,
                               d.size, jitter)
        with torch.no_grad():  # torso phase: the head is fixed; only the torso gets gradients
            head = render_rays(m, self.rot[fr], self.tr[fr], u, v, d.focal, d.cx, d.cy, cond, index, bg, None,
                               d.size, jitter)
        uv = torch.stack([(u + 0.5) / d.size, (v + 0.5) / d.size], dim=-1)
        t_rgb, alpha = m.torso(uv, pose)
        under = t_rgb * alpha[:, None] + (1 - alpha[:, None]) * bg
        head.rgb = head.head_rgb + (1 - head.head_opacity[:, None]) * under
        head.torso_alpha = alpha
        return head

    # ---- occupancy

    @torch.no_grad()
    def update_occupancy(self, it: int) -> None:
        t = self.preset.train
        m = self.model
        if it < t.occupancy_warmup or it >= t.iterations or it % t.occupancy_every:
            return

        def density(x: torch.Tensor) -> torch.Tensor:
            # a random training condition per call: the grid keeps the max over conditions
            cond = self._conditions(self.sampler.frames(1))
            return m.head.density(x, cond, None, m.level_mask())[0]

        first = it - t.occupancy_warmup < t.occupancy_every
        m.occupancy.update(density, cells="all" if first else max(1, m.occupancy.spec.num_cells // 4),
                           generator=self.gen)

    # ---- validation images, log and curve

    @torch.no_grad()
    def validate(self, it: int, torso: bool) -> dict:
        import cv2

        d = self.data
        self.model.eval()
        out = {}
        rows = []
        for name, f in (("holdout", int(self.hold_idx[len(self.hold_idx) // 2]) if len(self.hold_idx) else None),
                        ("train", int(self.train_idx[len(self.train_idx) // 2]))):
            if f is None:
                continue
            img, _ = render_frame(self.model, d.rotation[f], d.translation[f],
                                  self.model.frame_input(d.landmarks, d.mesh, f), d.background,
                                  d.focal, d.cx, d.cy, torso=torso)
            gt = d.images[f].astype(np.float32) / 255.0 if torso else d.head_target(f).astype(np.float32) / 255.0
            out[f"{name}_psnr"] = round(psnr(img, gt), 3)
            err = np.clip(np.abs(img - gt) * 4, 0, 1)
            rows.append(np.concatenate([gt, img, err], axis=1))
        self.model.train()
        sheet = (np.concatenate(rows, axis=0) * 255 + 0.5).astype(np.uint8)
        if sheet.shape[0] < 256:  # small training sizes: enlarge so that the sheet can be looked at
            k = int(np.ceil(256 / sheet.shape[0]))
            sheet = cv2.resize(sheet, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
        (self.out / "val").mkdir(parents=True, exist_ok=True)
        from .preprocess.frameio import write_image

        with atomic_path(self.out / "val" / f"{it:07d}.png") as tmp:
            write_image(tmp, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        return out

    def write_log(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "train_log.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.log_rows)
        if len(self.log_rows) >= 2:
            plot_curve(self.log_rows, self.out / "loss.png")

    # ---- the loop

    def run(self) -> dict:
        t = self.preset.train
        m = self.model
        m.train()
        start = self.state.iteration
        acc: dict[str, list] = {"loss": [], "psnr": [], "spr": []}
        # the native kernels build on first use (about a minute, once per machine): before the
        # clock and the progress bar start, so that neither the recorded training time nor the
        # bar's rate and ETA include the compiler
        _native.extension_for(next(m.parameters()))
        t0 = time.time() - self.state.seconds
        val = {}
        try:
            with progress.bar(f"train {self.kind}", self.total, unit="it") as bar:
                bar.advance(start)
                for it in range(start, self.total):
                    self.update_occupancy(it)
                    r = self.step(it)
                    acc["loss"].append(r["loss"])
                    acc["psnr"].append(r["psnr"])
                    acc["spr"].append(r["samples_per_ray"])
                    self.state.iteration = it + 1
                    self.state.seconds = time.time() - t0
                    if (it + 1) % t.log_every == 0 or it + 1 == self.total:
                        self.log_rows.append({
                            "iteration": it + 1, "phase": r["phase"], "loss": round(float(np.mean(acc["loss"])), 6),
                            "psnr": round(float(np.mean(acc["psnr"])), 3), "lr": r["lr"],
                            "levels": int(m.active_levels), "samples_per_ray": round(float(np.mean(acc["spr"])), 2),
                            "occupied": round(m.occupancy.occupied_fraction(), 4),
                            "seconds": round(self.state.seconds, 1)})
                        acc = {"loss": [], "psnr": [], "spr": []}
                    if (it + 1) % t.val_every == 0 and it + 1 < self.total:
                        val = self.validate(it + 1, torso=it + 1 > t.iterations)
                        self.write_log()
                    if (it + 1) % t.checkpoint_every == 0 and it + 1 < self.total:
                        self.save_checkpoint()
                        self.write_log()
                    bar.advance()
        except KeyboardInterrupt:
            self.save_checkpoint()
            self.write_log()
            raise
        val = self.validate(self.total, torso=t.torso_iterations > 0)
        self.write_log()
        return {"iterations": self.total, "seconds": round(self.state.seconds, 1),
                "train_psnr_last": self.log_rows[-1]["psnr"] if self.log_rows else None,
                "first_psnr": self.log_rows[0]["psnr"] if self.log_rows else None, **val,
                "occupied_fraction": round(m.occupancy.occupied_fraction(), 4),
                "holdout_frames": [int(self.hold_idx[0]), int(self.hold_idx[-1])] if len(self.hold_idx) else []}


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    ax[0].semilogy(it, [r["loss"] for r in rows])
    ax[0].set_title("loss")
    ax[1].plot(it, [r["psnr"] for r in rows])
    ax[1].set_title("batch PSNR (dB)")
    for a in ax:
        a.set_xlabel("iteration")
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- the stage


def run(ws: Workspace, preset: Preset, *, force: bool = False) -> dict:
    """Train (or resume, or skip when up to date) the avatar of ``ws`` the preset describes."""
    from .avatar.data import check_preprocessed

    trainer_cls = Trainer
    if preset.avatar == "meshhash":
        from .train_meshhash import MeshHashTrainer as trainer_cls
    kind = trainer_cls.kind
    out_dir = f"models/{kind}"

    t = preset.train
    check_preprocessed(ws)
    torch.set_num_threads(t.threads or os.cpu_count() or 1)
    upstream = {name: ws.record(name)["output_key"] for name in UPSTREAM}
    started = time.time()

    def fn() -> dict:
        data = load_subject(ws, t.size)
        train_idx, hold_idx = data.split(t.holdout_fraction)
        trainer = trainer_cls(ws, preset, data, train_idx, hold_idx, upstream)
        resumed = False if force else trainer.try_resume()
        summary = trainer.run()
        save_model(ws.path(model_file(kind)), trainer.model, preset,
                   {**trainer.model_extra(), "upstream": upstream, "train_frames": train_idx.tolist(),
                    "holdout_frames": hold_idx.tolist(), "fps": data.fps, "focal": data.focal, "cx": data.cx,
                    "cy": data.cy})
        write_json(ws.path(f"{out_dir}/config.json"), preset.to_dict())
        ckpt = ws.path(f"{out_dir}/checkpoint.pt")
        if ckpt.exists():
            ckpt.unlink()
        return {**summary, "resumed": resumed, "preset": preset.name}

    res = run_stage(ws, f"train_{kind}", code_version=CODE_VERSION, config=preset.to_dict(), inputs=upstream,
                    outputs=[model_file(kind), f"{out_dir}/config.json", f"{out_dir}/train_log.csv"], fn=fn,
                    force=force)
    return {"workspace": str(ws.root), "model": str(ws.path(model_file(kind))), "avatar": kind,
            "skipped": res.skipped,
            "preset": preset.name, **res.record.get("summary", {}), "wall_seconds": round(time.time() - started, 1)}
