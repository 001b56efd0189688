"""EXL3 conversion math: the trellis search (trellis.py) and the quantization of one linear (ldlq.py)."""
