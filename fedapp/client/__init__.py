"""The ClientApp: the NumPyClient bridge, the video client's train/evaluate, and the client mods (DP, compression, attacks)."""
