"""GPT-OSS in Flax NNX: the architecture, its parameters and its forward and decoding loops."""
