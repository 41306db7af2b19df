"""The ClientApp: the NumPyClient bridge, the video client's train/evaluate, the client mods (DP,
compression, attacks), the update encoder, and the per-message exchange they share."""
