"""What a reader computes for every frame: decode, pre-screen, spot finding, per-image stats, score."""
