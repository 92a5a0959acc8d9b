"""Benchmark harness: datasets, metrics (PSNR, SSIM, consistency-PSNR, offline FID/KID), suites and tables.

Run from the command line with ``restore-bench`` (`benchmarks.cli`).
"""
