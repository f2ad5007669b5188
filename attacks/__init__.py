"""The black-box membership inference attack of Pang & Wang (NDSS 2025).

This package sees models only through `benchmark.pipeline.target.BlackBoxTarget`; a test
checks it never imports model, training or split code.
"""
