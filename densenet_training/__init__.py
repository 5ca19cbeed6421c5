"""densenet_training: the training recipe and everything about a training run that is not a
framework.

Framework-free (numpy, plus safetensors for checkpoints; matplotlib only for the plot, which the
main process draws), importable in both environments. The three trainers
(densenet_torch/train.py, densenet_mxnet/train.py, densenet_flax/train.py) supply the model
code: ``train_epoch``, ``evaluate``, ``save_checkpoint``, ``load_checkpoint``; this package
supplies the rest, the same for all three:

* the book's recipe (``d2l.train_ch6``): SGD, learning rate 0.1, 10 epochs, batch 256,
  Xavier-uniform weights, softmax cross-entropy, the loss and accuracies reported per epoch;
* the command line (``make_parser``), shared by ``densenet train`` and the trainers' own
  processes (``trainer_main``: MXNet's environment, PyTorch's DDP processes under torchrun);
* data-parallel runs (``--devices N``): the checks that need no framework (``check_parallel``),
  batches that split evenly (``data.even_batches``), one process that reports and writes;
* the Xavier initial state, drawn once in the canonical form from the seed, so every backend
  starts from the same weights (``xavier_state``);
* progress (a bar per epoch with running loss and accuracy), per-epoch lines, the book's final
  line, the metrics JSON and the plot;
* checkpoints: a directory per epoch with the canonical model state (safetensors), the
  optimiser's state (safetensors, canonical names) and a small JSON; ``latest.json`` points at
  the newest complete one and is written last, so a run killed at any moment resumes from the
  last finished epoch.

The house-price recipe (d2l's Kaggle section with the MLP DenseNet of the chapter's exercise 5:
Adam, MSE on the prices, K-fold cross-validation, log-rmse) has its data in ``tabular`` and its
loop in ``house`` (``run_folds``); the trainers supply ``fit_house`` and its steps.

Modules: ``recipe`` (settings, command line, Xavier state), ``progress`` (reporters, the
per-epoch meter), ``checkpoints``, ``loop`` (``run_epochs``), ``plots``, ``data`` (the datasets),
``tabular`` and ``house`` (house prices).
Their public names are re-exported here: ``import densenet_training as training``.
"""
from densenet_training import data, tabular
from densenet_training.checkpoints import (checkpoints_dir, data_fingerprint, latest_checkpoint,
                                          optimizer_info, read_checkpoint, write_checkpoint)
from densenet_training.loop import (check_run_dir, lead_process, run_epochs, summarize,
                                    trainer_main, write_json)
from densenet_training.house import (HOUSE_METRICS_FORMAT, fold_initial_state, house_network,
                                     linear_state, run_folds)
from densenet_training.plots import plot_comparison, plot_house, plot_metrics
from densenet_training.progress import (ConsoleReporter, EpochMeter, EventReporter, Reporter,
                                        book_lines, epoch_line, exit_with_parent, relay)
from densenet_training.recipe import (BACKENDS, BOOK_BATCH_SIZE, BOOK_EPOCHS, BOOK_LR,
                                      CHECKPOINT_FORMAT, EVENT_PREFIX, METRICS_FORMAT,
                                      MOMENTUM_CONVENTION, RESUME_DEFAULTS, RESUME_KEYS,
                                      ResumeError, TrainConfig, UserError, check_cpu_devices,
                                      check_parallel, check_recipe, check_size, config_from_args,
                                      config_to_argv, HOUSE_BATCH_SIZE, HOUSE_LR, HOUSE_FOLDS,
                                      cpu_cores, parallel_kind,
                                      initial_state, make_parser, model_options, user_errors,
                                      xavier_state)

__all__ = [
    "data", "tabular", "HOUSE_METRICS_FORMAT", "fold_initial_state", "house_network",
    "linear_state", "run_folds", "plot_house", "check_recipe", "HOUSE_BATCH_SIZE", "HOUSE_LR",
    "HOUSE_FOLDS", "checkpoints_dir", "data_fingerprint", "latest_checkpoint", "optimizer_info",
    "read_checkpoint", "write_checkpoint", "check_run_dir", "lead_process", "run_epochs",
    "summarize",
    "trainer_main", "write_json",
    "plot_comparison", "plot_metrics", "ConsoleReporter", "EpochMeter", "EventReporter",
    "Reporter", "book_lines", "epoch_line", "exit_with_parent", "relay", "BACKENDS",
    "BOOK_BATCH_SIZE", "BOOK_EPOCHS", "BOOK_LR", "CHECKPOINT_FORMAT", "EVENT_PREFIX",
    "METRICS_FORMAT", "MOMENTUM_CONVENTION", "RESUME_DEFAULTS", "RESUME_KEYS", "ResumeError",
    "TrainConfig", "UserError", "check_cpu_devices", "check_parallel", "check_size",
    "config_from_args", "config_to_argv", "cpu_cores", "parallel_kind", "initial_state",
    "make_parser", "model_options", "user_errors", "xavier_state",
]
