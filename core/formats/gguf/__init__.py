"""llama.cpp's GGUF files, imported into an unquantized Hugging Face folder."""
