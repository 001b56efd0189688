"""One folder per checkpoint format, each with the same faces:

    layout.py     the tensor layout: packing, unpacking, the checks on a layer's tensors
    reader.py     what a checkpoint in the format holds (the loader's entry: registry.py)
    writer.py     where we write the format
    reference.py  the torch dequantize and product: the CPU path, and the kernels' twins
    kernel.py     the glue to its CUDA kernels in core/kernels/: plan and product
    linear.py     its QuantizedLinear (core/linear.py)

registry.py lists the formats the loader reads.
"""
