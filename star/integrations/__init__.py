"""Bridges to the evaluation tools researchers already use; each needs its own optional extra (e.g. `star-vlm[lmms]`)."""
