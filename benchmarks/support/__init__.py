"""What several benchmarks share, written once.

* :mod:`benchmarks.support.meta`: run metadata (date, machine, command), how busy the machine
  is, load averages, JSON output;
* :mod:`benchmarks.support.paths`: the repository root and the real-data folder
  (``$PRUNEGRAPH_REALDATA``);
* :mod:`benchmarks.support.procfs`: resident memory from /proc and ``getrusage``, a sampler of
  other processes' peaks;
* :mod:`benchmarks.support.ports`: a free TCP port on 127.0.0.1;
* :mod:`benchmarks.support.flops`: MACs and parameters by torch-pruning's counter;
* :mod:`benchmarks.support.compensation`: a compensated plan applied with or without its folds,
  MACs without the biases the folds create;
* :mod:`benchmarks.support.tp_search`: Torch-Pruning's global magnitude pruner with its
  ``pruning_ratio`` bisected to a FLOPs reduction (these three import torch; the others do not).
"""
