"""Person matting, head/torso masks and a background plate, from the workspace frames.

Everything runs on models shipped in the mediapipe wheel (no downloads):

* **Alpha.** MediaPipe selfie segmentation, the *general* model (``model_selection=0``): it reads
  a 256x256 square, the shape of the workspace frames, where the landscape model squeezes them to
  144x256; on the fixture clips it flickers less from frame to frame, leaves fewer undecided
  pixels and does not pick up the flag behind the speaker. Its soft person probability is refined
  with a colour guided filter (``cv2.ximgproc.guidedFilter``, the frame as guide) run at a working
  size of at most ``GUIDE_SIDE`` pixels (radius in proportion to it, uint8 guide) and upsampled.
  The filter moves alpha only within a few pixels of the model's edge (where the probability is
  flat it returns it unchanged); at full resolution it would cost 15-20 ms per 512² frame on two
  cores for an edge that differs by 2-3% of alpha in the edge band (0.05% of the pixels change
  side of 0.5).
* **Masks** (uint8 labels): 0 background, 1 torso, 2 head. The head region is built from the face
  mesh landmarks in the face's own frame (up = chin -> forehead, so rolled heads work): the face
  oval (slightly enlarged), an ellipse around it that reaches up and sideways for the hair and ears
  and stops at the jaw angle (shifted away from the nose on a turned head: the back of the skull),
  and the neck: a band a little wider than the jaw, from the jaw angle down to ``NECK_CUT`` face
  heights below the chin, where it counts only the pixels with the chroma of the face's skin
  (collar, tie and neckline stay torso). Head = person pixels (alpha >= 0.5) in that region, torso
  = the other person pixels. Frames without landmarks use the nearest tracked frame's face; with
  no landmarks at all every person pixel is torso.
* **Background plate.** Up to ``PLATE_FRAMES`` evenly spaced frames are kept during the pass
  together with where they show background (alpha < ``BG_ALPHA``, pulled a few pixels away from
  the person); the plate is the per-pixel median over the frames where the pixel is background,
  and the pixels seen there too rarely are filled with ``cv2.inpaint`` (Telea).

Outputs of :func:`run_matting` (``out_dir`` becomes the workspace's ``matting/``)::

    alpha/%06d.png    uint8 grey, person alpha * 255
    masks/%06d.png    uint8 grey, labels 0 background, 1 torso, 2 head
    bg.png            the background plate (colour PNG)
    bg_inpainted.png  uint8 0/255, the plate pixels that were inpainted (never seen as background)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError, NotAvailable
from .detect import quiet_native_stderr
from .frameio import BackgroundWriter, prefetch, read_rgb, write_image

BACKGROUND, TORSO, HEAD = 0, 1, 2

MODEL_SELECTION = 0  # general model, 256x256 input (see the module docstring)
GUIDE_SIDE = 256  # the guided filter runs at most at this size (longest side)
GUIDE_RADIUS = 1 / 128  # of the working size: 2 px at 256 (4 px of a 512 frame)
GUIDE_EPS = 1e-3  # on a [0, 1] guide: edges with a local contrast above ~0.03 steer the alpha
PERSON_ALPHA = 0.5  # alpha threshold of the person in the label masks

# Head geometry, in face units: H = forehead top (landmark 10) to chin (152), W = cheek to cheek
# (234 to 454), measured from the face centre (midpoint of 10 and 152), "up" towards the forehead.
OVAL_SCALE = 1.08  # the face oval, enlarged about the face centre (cheek and jaw edges)
HAIR_CENTRE = 0.25  # H above the face centre: centre of the hair ellipse
HAIR_UP = 1.0  # H, its semi-axis along up: the top is 0.75 H above the forehead landmark
HAIR_SIDE = 0.8  # W, its semi-axis sideways: 1.6x the face half-width
NECK_CUT = 0.42  # H below the chin: where the neck ends and the torso begins
NECK_WIDTH = 1.25  # of the jaw width (between the jaw angles, landmarks 58 - 288): the neck flares below it
YAW_SHIFT = 1.0  # the hair ellipse moves this many times the nose's sideways offset, away from it
SKIN_SAMPLE = 0.7  # the face oval shrunk to this: the pixels that teach the skin colour
SKIN_DISTANCE = 3.5  # neck pixels within this many robust deviations of the face chroma are skin
SKIN_MIN_SPREAD = 2.5  # floor of the chroma deviation (8-bit Cr/Cb levels)

PLATE_FRAMES = 60  # frames sampled for the background plate
PLATE_MEMORY = 256 << 20  # bytes the kept samples may take (fewer frames for large sizes)
BG_ALPHA = 0.05  # background where alpha is below this ...
BG_MARGIN = 1 / 96  # ... and this far (of the image size) from any pixel above it

# Landmarks (mediapipe face mesh)
FOREHEAD, CHIN, CHEEK_R, CHEEK_L = 10, 152, 234, 454
JAW_ANGLE_R, JAW_ANGLE_L = 58, 288  # the face oval at the jaw angles
NOSE_TIP = 1


@functools.lru_cache(maxsize=1)
def face_oval() -> np.ndarray:
    """Indices of mediapipe's face-oval landmarks, in order around the face."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    nxt = {}
    for a, b in FACEMESH_FACE_OVAL:
        nxt[a] = b
    start = FOREHEAD
    order = [start]
    while nxt[order[-1]] != start:
        order.append(nxt[order[-1]])
    return np.array(order, np.int64)


# --------------------------------------------------------------------------- alpha


class Matter:
    """Person alpha of RGB frames: selfie segmentation refined with a colour guided filter.

    ``Matter()(rgb)`` -> HxW float32 in [0, 1]. Use as a context manager or call ``close()``.
    """

    def __init__(self, model_selection: int = MODEL_SELECTION, guided: bool = True):
        import cv2

        if not hasattr(cv2, "ximgproc"):  # opencv-contrib is a dependency; say so if it is missing
            raise NotAvailable("matting needs cv2.ximgproc: install opencv-contrib-python (not opencv-python)")
        self.guided = guided
        with quiet_native_stderr():
            import mediapipe as mp

            self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
            self._seg.process(np.zeros((64, 64, 3), np.uint8))  # first-inference logs, silenced

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        """The segmentation model's person probability, HxW float32."""
        mask = self._seg.process(np.ascontiguousarray(rgb)).segmentation_mask
        return np.array(mask, np.float32)  # a copy: the graph's buffer is not ours to keep

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        p = self.probability(rgb)
        if not self.guided:
            return np.clip(p, 0.0, 1.0)
        return refine(rgb, p)

    def close(self) -> None:
        self._seg.close()

    def __enter__(self) -> "Matter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refine(rgb: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Snap a soft mask to the image edges: colour guided filter at <= GUIDE_SIDE px, upsampled."""
    import cv2

    h, w = prob.shape
    s = min(1.0, GUIDE_SIDE / max(h, w))
    if s < 1.0:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        guide = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        src = cv2.resize(prob, size, interpolation=cv2.INTER_AREA)
    else:
        guide, src = rgb, prob
    radius = max(1, round(GUIDE_RADIUS * max(guide.shape[:2])))
    # a uint8 guide works in 0..255 units (eps scaled to match); with a float32 [0, 1] guide
    # OpenCV's single-precision covariance inversion goes wrong for eps below ~1e-2
    q = cv2.ximgproc.guidedFilter(np.ascontiguousarray(guide), src, radius, GUIDE_EPS * 255.0**2)
    if s < 1.0:
        q = cv2.resize(q, (w, h), interpolation=cv2.INTER_LINEAR)
    # the filter overshoots a little at strong edges; clip and snap the near-certain tails
    q = (q - np.float32(0.02)) * np.float32(1 / 0.96)
    return np.clip(q, 0.0, 1.0, out=q)


# --------------------------------------------------------------------------- head / torso masks


def _face_frame(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Face centre, up and side unit vectors (image coords), face height H and width W."""
    top, chin = pts[FOREHEAD, :2].astype(np.float64), pts[CHIN, :2].astype(np.float64)
    up = top - chin
    height = float(np.hypot(*up))
    up = up / max(height, 1e-6)
    side = np.array([-up[1], up[0]])  # towards image right for an upright face (up = (0, -1))
    if side[0] < 0:
        side = -side
    width = abs(float(np.dot(pts[CHEEK_L, :2] - pts[CHEEK_R, :2], side)))
    return (top + chin) / 2, up, side, height, max(width, 1e-6)


def head_region_polygons(pts: np.ndarray) -> dict[str, np.ndarray]:
    """The head region of one face as polygons (float (K, 2) image coordinates).

    ``pts``: (>=468, 2+) landmarks of the frame. Returns ``oval`` (the enlarged face oval),
    ``hair`` (the ellipse for hair and ears, cut at the jaw angle) and ``neck`` (the band from the
    jaw angle to the cut line below the chin).
    """
    centre, up, side, H, W = _face_frame(pts)

    def to_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # a sideways, b up, in pixels
        return centre + a[:, None] * side + b[:, None] * up

    oval = pts[face_oval(), :2].astype(np.float64)
    oval = centre + (oval - centre) * OVAL_SCALE

    # the jaw angle: below it the hair ellipse stops (no shoulders in the head), the neck begins
    jaw_r, jaw_l = pts[JAW_ANGLE_R, :2].astype(np.float64), pts[JAW_ANGLE_L, :2].astype(np.float64)
    angle_b = float(np.mean([np.dot(pts[i, :2] - centre, up) for i in (JAW_ANGLE_R, JAW_ANGLE_L)]))
    # a turned head shows more skull behind the face: move the ellipse away from the nose
    nose_a = float(np.dot(pts[NOSE_TIP, :2] - centre, side))
    shift = -YAW_SHIFT * float(np.clip(nose_a, -0.25 * W, 0.25 * W))
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    a = shift + HAIR_SIDE * W * np.cos(t)
    b = HAIR_CENTRE * H + HAIR_UP * H * np.sin(t)
    hair = to_image(a, np.maximum(b, angle_b))

    jaw_half = NECK_WIDTH * abs(float(np.dot(jaw_l - jaw_r, side))) / 2
    jaw_mid = float(np.dot((jaw_l + jaw_r) / 2 - centre, side))
    cut_b = -H / 2 - NECK_CUT * H
    neck = to_image(np.array([jaw_mid - jaw_half, jaw_mid + jaw_half, jaw_mid + jaw_half, jaw_mid - jaw_half]),
                    np.array([angle_b, angle_b, cut_b, cut_b]))
    return {"oval": oval, "hair": hair, "neck": neck}


Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (exclusive ends)


def _box(polys: list[np.ndarray], shape: tuple[int, int]) -> Box:
    pts = np.concatenate(polys)
    y0, x0 = np.floor(pts.min(axis=0)[::-1]).astype(int) - 1
    y1, x1 = np.ceil(pts.max(axis=0)[::-1]).astype(int) + 2
    y0, x0 = min(max(0, y0), shape[0]), min(max(0, x0), shape[1])
    return y0, max(y0, min(shape[0], y1)), x0, max(x0, min(shape[1], x1))


def _fill(polys: list[np.ndarray], shape: tuple[int, int], box: Box | None = None) -> np.ndarray:
    """uint8 0/1 union of the filled polygons, over ``box`` of an image of ``shape`` (all of it)."""
    import cv2

    y0, y1, x0, x1 = box or (0, shape[0], 0, shape[1])
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shift = 4  # sub-pixel vertices
    for p in polys:  # filled one by one: their union
        q = np.round((p - (x0, y0)) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(out, [q], 1, lineType=cv2.LINE_8, shift=shift)
    return out


@dataclasses.dataclass
class HeadRegion:
    """Where the head can be in one frame.

    ``core`` (HxW uint8 0/1: face oval, hair, ears) is head wherever the person is. ``neck``
    (uint8 0/1 over ``neck_box``: the band below the jaw, outside the core) is head where it has
    the chroma of the face's skin, so that collars, ties and clothes in the band stay torso; the
    skin colour is learnt from ``sample`` (uint8 0/1 over ``sample_box``, the inner face).
    """

    core: np.ndarray
    neck: np.ndarray
    neck_box: Box
    sample: np.ndarray
    sample_box: Box


def head_region(pts: np.ndarray, shape: tuple[int, int]) -> HeadRegion:
    polys = head_region_polygons(pts)
    core = _fill([polys["oval"], polys["hair"]], shape)
    nb = _box([polys["neck"]], shape)
    neck = _fill([polys["neck"]], shape, nb)
    neck[core[nb[0]:nb[1], nb[2]:nb[3]] > 0] = 0
    centre = _face_frame(pts)[0]
    inner = centre + (pts[face_oval(), :2].astype(np.float64) - centre) * SKIN_SAMPLE
    sb = _box([inner], shape)
    return HeadRegion(core, neck, nb, _fill([inner], shape, sb), sb)


def skin_like(rgb: np.ndarray, region: HeadRegion) -> np.ndarray:
    """uint8 0/1 over ``region.neck_box``: neck pixels within SKIN_DISTANCE robust deviations of
    the face's chroma (Cr, Cb), cleaned with a small opening and closing."""
    import cv2

    y0, y1, x0, x1 = region.neck_box
    sy0, sy1, sx0, sx1 = region.sample_box
    if region.neck.size == 0 or region.sample.sum() < 16:
        return np.zeros_like(region.neck)
    face = cv2.cvtColor(np.ascontiguousarray(rgb[sy0:sy1:2, sx0:sx1:2]), cv2.COLOR_RGB2YCrCb)
    face = face[region.sample[::2, ::2] > 0][:, 1:].astype(np.float32)
    if len(face) < 16:
        return np.zeros_like(region.neck)
    med = np.median(face, axis=0)
    spread = np.maximum(1.4826 * np.median(np.abs(face - med), axis=0), SKIN_MIN_SPREAD)
    crcb = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2YCrCb)[:, :, 1:].astype(np.float32)
    d2 = (((crcb - med) / spread) ** 2).sum(axis=2)
    skin = ((d2 < SKIN_DISTANCE**2) & (region.neck > 0)).astype(np.uint8)
    side = max(rgb.shape[:2])
    ro, rc = max(1, round(side / 160)), max(1, round(side / 96))  # 3 and 5 px at 512
    skin = cv2.morphologyEx(skin, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ro + 1,) * 2))
    skin = cv2.morphologyEx(skin, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rc + 1,) * 2))
    return skin & region.neck


def labels_from_alpha(alpha: np.ndarray, region: HeadRegion | None, rgb: np.ndarray | None = None) -> np.ndarray:
    """uint8 labels: 0 background, 1 torso (person outside the head region), 2 head.

    The neck band counts as head where ``rgb`` looks like the face's skin (all of it without rgb).
    """
    person = (alpha >= PERSON_ALPHA).view(np.uint8)
    if region is None:
        return person.copy()
    head = region.core.copy()
    y0, y1, x0, x1 = region.neck_box
    head[y0:y1, x0:x1] |= skin_like(rgb, region) if rgb is not None else region.neck
    return person + (person & head)  # TORSO 1, HEAD 2


def nearest_tracked(ok: np.ndarray) -> np.ndarray:
    """For every frame the index of the nearest frame with landmarks (-1 when there are none)."""
    ok = np.asarray(ok, bool)
    n = len(ok)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return np.full(n, -1, np.int64)
    pos = np.searchsorted(idx, np.arange(n))
    lo = idx[np.clip(pos - 1, 0, len(idx) - 1)]
    hi = idx[np.clip(pos, 0, len(idx) - 1)]
    frames = np.arange(n)
    return np.where(np.abs(frames - lo) <= np.abs(hi - frames), lo, hi)


# --------------------------------------------------------------------------- background plate


def background_mask(alpha: np.ndarray) -> np.ndarray:
    """bool HxW: certainly background (alpha < BG_ALPHA, a few pixels away from the person)."""
    import cv2

    near = (alpha >= BG_ALPHA).astype(np.uint8)
    r = max(1, round(BG_MARGIN * max(alpha.shape)))
    near = cv2.dilate(near, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return near == 0


def plate_indices(n: int, shape: tuple[int, int], max_frames: int = PLATE_FRAMES) -> np.ndarray:
    """Evenly spaced frame indices for the plate, bounded by PLATE_FRAMES and PLATE_MEMORY."""
    per_frame = shape[0] * shape[1] * 4  # RGB + mask byte
    k = max(1, min(n, max_frames, PLATE_MEMORY // max(per_frame, 1)))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def background_plate(frames: np.ndarray, bg: np.ndarray, min_count: int | None = None,
                     rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Median of each pixel over the frames where it is background; inpaint the rest.

    ``frames`` (K, H, W, 3) uint8, ``bg`` (K, H, W) bool. Returns (plate HxWx3 uint8, inpainted
    HxW bool). A pixel needs ``min_count`` background samples (default: 5% of K, 1 to 3).
    """
    import cv2

    k, h, w = bg.shape
    if min_count is None:
        min_count = max(1, min(3, math.ceil(0.05 * k)))
    plate = np.zeros((h, w, 3), np.uint8)
    count = bg.sum(axis=0)
    for y0 in range(0, h, rows):  # in bands of rows, samples last: sorting a contiguous axis is fast
        y1 = min(h, y0 + rows)
        v = np.moveaxis(frames[:, y0:y1], 0, -1).astype(np.uint16, order="C")  # (rows, W, 3, K)
        v[~np.moveaxis(bg[:, y0:y1], 0, -1)[:, :, None, :].repeat(3, axis=2)] = 256  # sorts last
        v.sort(axis=-1)
        c = count[y0:y1, :, None, None]
        lo = np.broadcast_to(np.maximum(c - 1, 0) // 2, (*v.shape[:3], 1))
        hi = np.broadcast_to(np.maximum(c, 1) // 2, (*v.shape[:3], 1))
        med = (np.take_along_axis(v, lo, -1)[..., 0] + np.take_along_axis(v, hi, -1)[..., 0] + 1) // 2
        plate[y0:y1] = np.minimum(med, 255).astype(np.uint8)
    holes = count < min_count
    if holes.any() and not holes.all():
        radius = max(3, round(max(h, w) / 100))
        plate = cv2.inpaint(plate, holes.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    elif holes.all():  # no background anywhere: the plate is the per-pixel median of the frames
        plate = np.median(frames, axis=0).astype(np.uint8)
    return plate, holes


# --------------------------------------------------------------------------- workspace pass


def _write_png(path: Path, img: np.ndarray, masks: bool = True) -> None:
    import cv2

    # masks and alpha are mostly flat: run-length deflate is both the fastest and the smallest
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE] if masks else []
    write_image(Path(path), img, params)


def run_matting(frame_paths: Iterable[Path], points: np.ndarray, ok: np.ndarray, out_dir: Path,
                progress=None) -> dict:
    """Alpha, head/torso masks and the background plate of a workspace's frames (see module doc).

    ``frame_paths`` is read once, one frame at a time (a list or any iterable of ``len(ok)``
    paths); ``points`` (N, 478, 3) and ``ok`` (N,) come from ``landmarks.npz``. Writes into
    ``out_dir`` and returns a summary of numbers.
    """
    import cv2

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "alpha").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    points = np.asarray(points)
    ok = np.asarray(ok, bool)
    n = len(ok)
    source = nearest_tracked(ok)

    person_sum = head_sum = torso_sum = 0.0
    frames_done = 0
    samples = sample_bg = None  # the plate's frames and where they show background
    slot: dict[int, int] = {}  # frame index -> row in samples
    region_cache: tuple[int, HeadRegion] | None = None
    t_compute = 0.0
    with Matter() as matter, BackgroundWriter() as writer:
        for i, (path, rgb) in enumerate(prefetch((p, read_rgb(Path(p))) for p in frame_paths)):
            if i >= n:
                raise InputError(f"more frames than landmarks ({n}); rerun with --force")
            tc = time.perf_counter()
            h, w = rgb.shape[:2]
            if i == 0:
                slot = {int(k): r for r, k in enumerate(plate_indices(n, (h, w)))}
                samples = np.empty((len(slot), h, w, 3), np.uint8)
                sample_bg = np.empty((len(slot), h, w), bool)
            elif rgb.shape != samples.shape[1:]:
                raise InputError(f"frame {path} is {w}x{h}, not {samples.shape[2]}x{samples.shape[1]} as the first")
            alpha = matter(rgb)
            j = int(source[i])
            if j < 0:
                region = None
            elif region_cache is not None and region_cache[0] == j:
                region = region_cache[1]
            else:
                region = head_region(points[j], (h, w))
                region_cache = (j, region)
            labels = labels_from_alpha(alpha, region, rgb)
            a8 = cv2.convertScaleAbs(alpha, alpha=255.0)  # rounds and saturates
            if i in slot:
                samples[slot[i]] = rgb
                sample_bg[slot[i]] = background_mask(alpha)
            t_compute += time.perf_counter() - tc
            writer.submit(_write_png, out_dir / "alpha" / f"{i:06d}.png", a8)
            writer.submit(_write_png, out_dir / "masks" / f"{i:06d}.png", labels)
            area = float(h * w)
            person_sum += np.count_nonzero(labels) / area
            head_sum += np.count_nonzero(labels == HEAD) / area
            torso_sum += np.count_nonzero(labels == TORSO) / area
            frames_done += 1
            if progress is not None:
                progress.advance(1)
    if frames_done == 0:
        raise InputError("no frames to matte")
    if frames_done != n:
        raise InputError(f"{frames_done} frames but {n} landmark entries; rerun with --force")

    tp = time.perf_counter()
    plate, holes = background_plate(samples, sample_bg)
    t_plate = time.perf_counter() - tp
    _write_png(out_dir / "bg.png", cv2.cvtColor(plate, cv2.COLOR_RGB2BGR), masks=False)
    _write_png(out_dir / "bg_inpainted.png", holes.astype(np.uint8) * 255)
    total = time.perf_counter() - t0
    return {
        "frames": frames_done,
        "person_fraction": round(person_sum / frames_done, 4),
        "head_fraction": round(head_sum / frames_done, 4),
        "torso_fraction": round(torso_sum / frames_done, 4),
        "inpainted_fraction": round(float(holes.mean()), 4),
        "plate_frames": len(slot),
        "frames_without_face": int((~ok).sum()),
        "seconds_per_frame": round(total / frames_done, 5),
        "compute_seconds_per_frame": round(t_compute / frames_done, 5),
        "plate_seconds": round(t_plate, 3),
        "model_selection": MODEL_SELECTION,
    }


# --------------------------------------------------------------------------- preview


def _overlay(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = (rgb.astype(np.float32) * 0.45).astype(np.uint8)
    tint = (0.5 * rgb.astype(np.float32) + 0.5 * np.array(colour, np.float32)).astype(np.uint8)
    out[mask] = tint[mask]
    return out


def contact_sheet(frame_paths: Iterable[Path], out_dir: Path, path: Path, n_rows: int = 4,
                  cell: int = 256) -> None:
    """PNG preview: for ``n_rows`` evenly spaced frames [frame | alpha | head | torso], then a
    row with the background plate and its inpainted pixels. Reads ``out_dir`` of run_matting."""
    import cv2

    paths = list(frame_paths)  # paths only; the frames are read for the sampled rows
    out_dir = Path(out_dir)
    idx = np.unique(np.round(np.linspace(0, len(paths) - 1, min(n_rows, len(paths)))).astype(int))

    def fit(img: np.ndarray) -> np.ndarray:
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        s = cell / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((cell, cell, 3), np.uint8)
        canvas[:img.shape[0], :img.shape[1]] = img
        return canvas

    def label(img: np.ndarray, text: str) -> np.ndarray:
        img = img.copy()
        scale = cell / 512
        for colour, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(img, text, (6, int(22 * scale + 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale + 0.15,
                        colour, thick, cv2.LINE_AA)
        return img

    rows = []
    for i in idx:
        rgb = read_rgb(paths[i])
        alpha = cv2.imread(str(out_dir / "alpha" / f"{i:06d}.png"), cv2.IMREAD_GRAYSCALE)
        labels = cv2.imread(str(out_dir / "masks" / f"{i:06d}.png"), cv2.IMREAD_GRAYSCALE)
        if alpha is None or labels is None:
            raise InputError(f"matting outputs missing for frame {i} in {out_dir}")
        rows.append([label(fit(rgb), f"frame {i}"), label(fit(alpha), "alpha"),
                     label(fit(_overlay(rgb, labels == HEAD, (0, 255, 0))), "head"),
                     label(fit(_overlay(rgb, labels == TORSO, (0, 96, 255))), "torso")])
    plate = cv2.cvtColor(cv2.imread(str(out_dir / "bg.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    holes = cv2.imread(str(out_dir / "bg_inpainted.png"), cv2.IMREAD_GRAYSCALE) > 0
    blank = np.zeros((cell, cell, 3), np.uint8)
    rows.append([label(fit(plate), "background plate"),
                 label(fit(_overlay(plate, holes, (255, 0, 0))), f"inpainted {holes.mean():.0%}"),
                 blank, blank])
    sheet = np.vstack([np.hstack(r) for r in rows])
    _write_png(Path(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), masks=False)
