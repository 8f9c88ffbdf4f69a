"""prunegraph's benchmarks: each script a module, run from the repository root as
``python -m benchmarks.<name> [options]`` (``python -m benchmarks.speed --help``); the Makefile's
``bench``, ``bench-quality`` and ``bench-scale`` targets run the committed ones. Results and their
write-ups: ``benchmarks/RESULTS.md``. Shared helpers (real-data paths, run metadata and machine
load, /proc memory sampling, free ports, Torch-Pruning's ratio bisection) live in
:mod:`benchmarks.support`.

Families of modules:

* engine speed and memory: ``speed``, ``planning``, ``ci``, ``scale`` (+ ``scale_layers``,
  ``scale_checkpoint``, ``scale_cluster``, ``scale_dask``), ``service_overhead`` (+
  ``service_server``, ``service_http``);
* zero-shot fidelity of the real MobileNetV2: ``fidelity`` (+ ``fidelity_images``,
  ``fidelity_harness``, ``fidelity_report``), compensated plans ``fidelity_compensation`` (+
  ``fidelity_compensation_rows``, ``fidelity_compensation_report``), ``sensitivity_bench``,
  ``refit_probe``, ``compensation_speed``;
* plan quality on MNIST digits: ``quality`` (+ ``quality_pool``, ``quality_run``,
  ``quality_data``, ``quality_report``, ``quality_plot``, ``quality_allocation``),
  ``quality_compare``, ``quality_compensation``.
"""
