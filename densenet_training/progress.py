"""Progress of a run: what a trainer tells the user (a bar per epoch, per-epoch lines, the
book's final line), the JSON events the MXNet trainer's process sends its parent, and the
per-epoch accumulator of loss and accuracy."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

from densenet_training.recipe import EVENT_PREFIX

class Reporter:
    """What a trainer tells the user; the console one draws, the event one (the MXNet
    trainer's process) sends JSON lines to the parent, which draws them."""

    def start(self, info: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None: ...
    def batch(self, i: int, num_batches: int, loss: float, acc: float) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, metrics: dict) -> None: ...


def epoch_line(r: dict, epochs: int) -> str:
    compiling = (f" (+{r['compile_time']:.1f} s compiling)" if r.get("compile_time", 0) >= 0.05
                 else "")
    return (f"epoch {r['epoch']}/{epochs}: loss {r['loss']:.3f}, train acc {r['train_acc']:.3f}, "
            f"test acc {r['test_acc']:.3f}, {r['examples_per_sec']:.1f} examples/sec{compiling}")


def house_epoch_line(r: dict, epochs: int) -> str:
    compiling = (f" (+{r['compile_time']:.1f} s compiling)" if r.get("compile_time", 0) >= 0.05
                 else "")
    return (f"fold {r['fold']} epoch {r['epoch']}/{epochs}: loss {r['loss']:.4g}, train log rmse "
            f"{r['train_log_rmse']:.6f}, valid log rmse {r['valid_log_rmse']:.6f} (the book's, "
            f"train mode: {r['train_log_rmse_book']:.6f}, {r['valid_log_rmse_book']:.6f}), "
            f"{r['examples_per_sec']:.1f} examples/sec{compiling}")


def house_lines(metrics: dict) -> List[str]:
    """The book's lines: one per fold, then the K-fold average."""
    lines = [f"fold {f['fold']}, train log rmse {f['train_log_rmse']:f}, "
             f"valid log rmse {f['valid_log_rmse']:f}" for f in metrics["folds"]]
    s = metrics["final"]
    lines.append(f"{s['folds']}-fold validation: avg train log rmse: {s['train_log_rmse']:f}, "
                 f"avg valid log rmse: {s['valid_log_rmse']:f}")
    lines.append(f"as the book measures (train mode, BatchNorm over the set itself): avg train "
                 f"log rmse: {s['train_log_rmse_book']:f}, avg valid log rmse: "
                 f"{s['valid_log_rmse_book']:f}")
    return lines


def book_lines(metrics: dict) -> List[str]:
    """The book's closing lines (the house-price recipe's: one per fold and the average)."""
    if metrics.get("recipe") == "house":
        return house_lines(metrics)
    f = metrics["final"]
    return [f"loss {f['loss']:.3f}, train acc {f['train_acc']:.3f}, test acc {f['test_acc']:.3f}",
            f"{f['examples_per_sec']:.1f} examples/sec on {metrics['device']}"]


class _TextBar:
    """A progress bar without tqdm (the MXNet environment has none): one line, redrawn."""

    def __init__(self, total, desc, stream):
        self.total, self.desc, self.stream, self.t0 = total, desc, stream, time.perf_counter()

    def update(self, i, postfix):
        width = 24
        done = int(width * i / max(self.total, 1))
        rate = i / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\r{self.desc}: |{'#' * done}{'.' * (width - done)}| {i}/{self.total} "
                          f"[{rate:.2f} batch/s, {postfix}]")
        self.stream.flush()

    def close(self):
        self.stream.write("\r" + " " * 100 + "\r")
        self.stream.flush()


class ConsoleReporter(Reporter):
    """A bar per epoch (tqdm where installed) on a terminal; a line per epoch; the book's line."""

    def __init__(self, progress: bool = True, stream=None, bar_stream=None):
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream or sys.stderr
        self.progress = progress and getattr(self.bar_stream, "isatty", lambda: False)()
        self._bar = None
        self.epochs = 0
        self.house = False

    def start(self, info):
        self.epochs = info["epochs"]
        self.house = info.get("recipe") == "house"
        if self.house:
            resumed = info.get("resumed_from")
            network = "linear model" if info["model"] == "linear" else info["preset"]
            self._print(f"training {network} on {info['dataset']} ({info['train']} houses, "
                        f"{info['features']} features) with {info['backend']} on "
                        f"{info['device']}: {info['folds']}-fold cross-validation, "
                        f"{info['epochs']} epochs per fold, Adam lr {info['lr']}, weight decay "
                        f"{info['weight_decay']}, batch {info['batch_size']}" +
                        (f", resumed after fold {resumed['fold']} epoch {resumed['epoch']}"
                         if resumed else ""))
            return
        resumed = (f", resumed after epoch {info['resumed_from']}" if info.get("resumed_from")
                   else "")
        sync = ", synchronised BatchNorm" if info.get("sync_bn") else ""
        self._print(f"training {info['preset']} on {info['dataset']} ({info['train']} train / "
                    f"{info['test']} test, {info['size']}x{info['size']}) with {info['backend']} "
                    f"on {info['device']}: {info['epochs']} epochs, batch {info['batch_size']}, "
                    f"lr {info['lr']}{sync}{resumed}")

    def epoch_start(self, epoch, epochs, num_batches):
        if not self.progress:
            return
        desc = f"epoch {epoch}/{epochs}"
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=num_batches, desc=desc, unit="batch", leave=False,
                             file=self.bar_stream, dynamic_ncols=True)
        except ImportError:
            self._bar = _TextBar(num_batches, desc, self.bar_stream)

    def batch(self, i, num_batches, loss, acc):
        if self._bar is None:
            return
        postfix = f"loss {loss:.4g}" if self.house else f"loss {loss:.3f}, acc {acc:.3f}"
        if isinstance(self._bar, _TextBar):
            self._bar.update(i, postfix)
        else:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)

    def epoch_end(self, record):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._print(house_epoch_line(record, self.epochs) if self.house
                    else epoch_line(record, self.epochs))

    def message(self, text):
        self._print(text)

    def finish(self, metrics):
        for line in book_lines(metrics):
            self._print(line)

    def _print(self, text):
        print(text, file=self.stream, flush=True)


class EventReporter(Reporter):
    """JSON lines on ``stream`` (the MXNet trainer's stdout), replayed by ``relay``."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _send(self, event, **payload):
        self.stream.write(EVENT_PREFIX + json.dumps({"event": event, **payload}) + "\n")
        self.stream.flush()

    def start(self, info):
        self._send("start", info=info)

    def epoch_start(self, epoch, epochs, num_batches):
        self._send("epoch_start", epoch=epoch, epochs=epochs, num_batches=num_batches)

    def batch(self, i, num_batches, loss, acc):
        self._send("batch", i=i, num_batches=num_batches, loss=loss, acc=acc)

    def epoch_end(self, record):
        self._send("epoch_end", record=record)

    def message(self, text):
        self._send("message", text=text)

    def finish(self, metrics):
        self._send("finish", metrics=metrics)


def exit_with_parent() -> None:
    """For a trainer that reports to a parent process (MXNet's): die when the parent dies
    (Linux's PR_SET_PDEATHSIG, set here in the child rather than by a preexec_fn in a parent that
    may run threads). Elsewhere a dead parent closes the pipe and the next progress line ends
    the child."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get("DENSENET_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the parent died before prctl
        sys.exit(3)


def relay(line: str, reporter: Reporter) -> Optional[dict]:
    """Replay one line of an EventReporter's output on ``reporter``; other lines are printed.
    Returns the final metrics when the line is the 'finish' event."""
    if not line.startswith(EVENT_PREFIX):
        reporter.message(line.rstrip("\n"))
        return None
    ev = json.loads(line[len(EVENT_PREFIX):])
    kind = ev.pop("event")
    if kind == "start":
        reporter.start(ev["info"])
    elif kind == "epoch_start":
        reporter.epoch_start(**ev)
    elif kind == "batch":
        reporter.batch(**ev)
    elif kind == "epoch_end":
        reporter.epoch_end(ev["record"])
    elif kind == "message":
        reporter.message(ev["text"])
    elif kind == "finish":
        reporter.finish(ev["metrics"])
        return ev["metrics"]
    return None


class EpochMeter:
    """The book's Accumulator(3) over an epoch (loss sum, correct predictions, examples) and
    the points of its curve: d2l plots the running loss and accuracy 5 times per epoch."""

    def __init__(self, epoch: int, num_batches: int, reporter: Reporter):
        self.epoch, self.num_batches, self.reporter = epoch, num_batches, reporter
        self.loss_sum, self.correct, self.n, self.i = 0.0, 0, 0, 0
        self.curve: List[List[float]] = []
        self.first_loss: Optional[float] = None
        self.excluded = 0.0
        self.t0 = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time that is not training (compiling the step): reported apart, not in the rate."""
        self.excluded += seconds

    def update(self, loss: float, correct: int, n: int) -> None:
        """After each batch: its mean loss, its number of correct predictions, its size."""
        if self.first_loss is None:
            self.first_loss = float(loss)
        self.loss_sum += float(loss) * n
        self.correct += int(correct)
        self.n += int(n)
        self.i += 1
        loss_avg, acc = self.loss_sum / self.n, self.correct / self.n
        if self.i % max(self.num_batches // 5, 1) == 0 or self.i == self.num_batches:
            self.curve.append([self.epoch - 1 + self.i / self.num_batches, loss_avg, acc])
        self.reporter.batch(self.i, self.num_batches, loss_avg, acc)

    def result(self) -> dict:
        seconds = time.perf_counter() - self.t0 - self.excluded
        return {"epoch": self.epoch, "loss": self.loss_sum / max(self.n, 1),
                "train_acc": self.correct / max(self.n, 1), "examples": self.n,
                "train_time": seconds, "compile_time": self.excluded,
                "examples_per_sec": self.n / max(seconds, 1e-12),
                "first_loss": self.first_loss, "curve": self.curve}
