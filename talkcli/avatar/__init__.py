"""Avatar models trained on a preprocessed workspace.

``config`` (typed presets), ``data`` (the workspace's frames, masks, cameras and conditions as a
training set), ``fields`` (M-AGLO MLPs), ``r2talker`` (landmark encoder + conditioned head NeRF),
``torso`` (RAD-NeRF-style 2D torso), ``render`` (rays -> samples -> composite, whole frames).
"""
