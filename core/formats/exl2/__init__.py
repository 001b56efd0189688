"""EXL2, ExLlamaV2's mixed-bit format: the one quantlab's converter writes."""
