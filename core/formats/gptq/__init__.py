"""GPTQ 4-bit checkpoints as AutoGPTQ and GPTQModel write them."""
