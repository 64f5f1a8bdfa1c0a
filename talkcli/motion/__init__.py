"""Motion for driving an avatar: audio -> 68 landmarks (``audio2motion``), expression files and
other subjects' tracks (``sources``), head pose and blinks (``pose``)."""
