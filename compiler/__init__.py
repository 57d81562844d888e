"""EdgeLoop compiler: hardware profiles, TVM builds, accuracy gate and signed artifacts.

Importing this package is cheap: the heavy parts (TVM, ONNX, torch) are imported by the
modules that need them (``compiler.frontends``, ``compiler.tvm_builder``) when called.
"""
