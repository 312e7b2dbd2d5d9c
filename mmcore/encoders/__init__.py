"""Modality encoders: each turns one input modality into a token sequence (B, N, C) plus a key-padding mask."""
