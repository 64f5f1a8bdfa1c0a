#!/usr/bin/env bash
# Preprocess, train and render a folder of videos against a folder of audio files.
#
#   docs/examples/batch.sh videos/ audio/ out/
#
# Each video becomes a workspace out/ws/<name>/ (cached: rerunning skips what is done and resumes
# an interrupted training), each (video, audio) pair an MP4 out/<video>__<audio>.mp4, and every
# step's JSON summary lands in out/logs/. A failing step is reported and the batch goes on; the
# script's exit code is the number of failures (0: all good).
set -uo pipefail
videos=${1:?videos folder}; audio=${2:?audio folder}; out=${3:?output folder}
talk=${TALK:-talk}
mkdir -p "$out/ws" "$out/logs"
failures=0
for video in "$videos"/*; do
  [ -f "$video" ] || continue
  name=$(basename "${video%.*}")
  ws="$out/ws/$name"
  if ! $talk --quiet preprocess "$video" -w "$ws" --json > "$out/logs/$name.preprocess.json"; then
    echo "preprocess failed: $video (exit $?)" >&2; failures=$((failures + 1)); continue
  fi
  if ! $talk --quiet train "$ws" --json > "$out/logs/$name.train.json"; then
    echo "train failed: $video" >&2; failures=$((failures + 1)); continue
  fi
  for speech in "$audio"/*; do
    [ -f "$speech" ] || continue
    a=$(basename "${speech%.*}")
    if ! $talk --quiet render "$ws" --audio "$speech" -o "$out/${name}__${a}.mp4" --json \
        > "$out/logs/${name}__${a}.render.json"; then
      echo "render failed: $video with $speech" >&2; failures=$((failures + 1))
    fi
  done
done
echo "done: $failures failure(s)" >&2
exit "$failures"
