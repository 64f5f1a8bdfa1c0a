"""Viseme features: what the mouth is saying, from a phone recogniser that ships inside its package.

Log-mel windows describe the sound; on a few minutes of one speaker a regressor on them mostly
learns the voice, not the mouth. Phones carry the articulation directly: bilabials (p b m) close
the lips, f/v bring them to the teeth, w/oo round them, open vowels drop the jaw. PocketSphinx's
English acoustic model and phone language model are part of the ``pocketsphinx`` wheel (no
download), and its phone-loop decoding runs at about 20x real time on one core.

    16 kHz samples --phone-loop decoding, 30 s utterances--> phones on a 10 ms grid
      --viseme class--> one-hot (T, per_frame, len(VISEMES)) at the log-mel windows' centres

The features have the log-mel layout, so ``audio2motion`` windows and regresses them the same
way. The recogniser knows English phones; other languages get the nearest English ones, and
cross-validation then prefers the log-mel features where those predict the mouth better.
"""

from __future__ import annotations

import numpy as np

# Phones (CMU set) grouped by what the lips and jaw do; index 0 is silence and noise.
VISEMES: tuple[tuple[str, ...], ...] = (
    ("SIL",),
    ("P", "B", "M"),                          # lips closed
    ("F", "V"),                               # lower lip to the teeth
    ("TH", "DH"),                             # tongue between the teeth
    ("T", "D", "N", "L", "S", "Z"),           # alveolar: teeth close, lips relaxed
    ("SH", "ZH", "CH", "JH"),                 # lips pushed forward
    ("K", "G", "NG", "HH", "Y"),              # back of the mouth: lips take the neighbouring vowel
    ("W", "UW", "UH", "OW", "OY"),            # rounded
    ("R", "ER"),
    ("AA", "AH", "AO", "AW", "AY"),           # open
    ("AE", "EH", "EY"),                       # mid, spread
    ("IY", "IH"),                             # close, spread
)
CLASS = {p: i for i, group in enumerate(VISEMES) for p in group}
FRAME_S = 0.01          # the decoder's frame step
UTTERANCE_S = 30.0      # decode long audio in pieces: bounded memory and search


def available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


def _decoder():
    import os

    from pocketsphinx import Decoder, get_model_path

    # phone-loop decoding with the phone bigram; beams and weights as CMU recommends for it
    return Decoder(allphone=os.path.join(get_model_path(), "en-us", "en-us-phone.lm.bin"),
                   lw=2.0, pip=0.3, beam=1e-20, pbeam=1e-20, loglevel="FATAL")


def phone_track(samples: np.ndarray, sr: int = 16000) -> np.ndarray:
    """Viseme class per 10 ms of ``samples`` (mono float at 16 kHz), 0 where silent."""
    if sr != 16000:
        raise ValueError("the phone recogniser's acoustic model is for 16 kHz audio")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
    n = int(np.ceil(len(pcm) / (FRAME_S * sr)))
    track = np.zeros(n, np.int64)
    dec = _decoder()
    step = int(UTTERANCE_S * sr)
    for start in range(0, len(pcm), step):
        dec.start_utt()
        dec.process_raw(pcm[start:start + step].tobytes(), full_utt=True)
        dec.end_utt()
        offset = int(round(start / (FRAME_S * sr)))
        # seg() is None, not empty, when the decoder made no hypothesis: a piece shorter than its
        # analysis window (a truncated file, or the last few ms after a 30 s utterance)
        for seg in dec.seg() or ():
            track[offset + seg.start_frame: offset + seg.end_frame + 1] = CLASS.get(seg.word, 0)
    return track


def viseme_features(samples: np.ndarray, sr: int, fps: float, n_frames: int, per_frame: int = 4) -> np.ndarray:
    """(n_frames, per_frame, len(VISEMES)) float32 one-hot viseme at each log-mel window centre
    (frame i, window j: (i + (j + 0.5) / per_frame) / fps seconds)."""
    track = phone_track(samples, sr)
    centres = (np.arange(n_frames * per_frame) + 0.5) / (fps * per_frame)
    idx = np.clip((centres / FRAME_S).astype(np.int64), 0, max(0, len(track) - 1))
    cls = track[idx] if len(track) else np.zeros(len(idx), np.int64)
    return np.eye(len(VISEMES), dtype=np.float32)[cls].reshape(n_frames, per_frame, len(VISEMES))
