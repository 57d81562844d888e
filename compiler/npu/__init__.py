"""NPU compilation: int8 post-training quantization to TFLite, then the vendor compiler.

Modules::

    quantize      pure: activation/weight/bias quantization parameters (numpy only)
    data          calibration samples and the (held-out or --eval-data) accuracy samples
    lower         ONNX graph -> int8 TFLite layers (NHWC), calibrated with ONNX Runtime
    tflite_writer the .tflite flatbuffer of those layers (``tflite`` flatbuffers builders)
    vela          adapter: Arm Vela (ethos-u-vela) for Ethos-U; parses its summary
    offload       pure: NPU/CPU split of operators and MACs from the compiled model
    build         ``compile_npu``: the whole NPU path of ``edgeloop compile``

See docs/npu.md for the pipeline and the design for other NPU families.
"""
