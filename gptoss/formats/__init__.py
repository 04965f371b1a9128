"""Files on disk: checkpoints (safetensors, HF and original/ layouts, MXFP4), params files, tokenizers, the Hub."""
