"""What differs between the frameworks' optimisers, measured: ``python -m benchmarks.compare_training``.

For each optimiser and option (ROWS) it runs ``densenet compare-training`` (the same
function, densenet_parity.side_by_side.compare_training) for 100 float64 steps on the book
preset (digits at 64 px, batch 8: over a batch of 2 BatchNorm's statistics are so ill-conditioned
that even exact backends part by 1e-6 within 50 steps; a row takes minutes on this 2-core
machine) and writes the table, for each row how each framework writes
it, what it computes (each backend's ``recipe_limits``: empty means PyTorch's update) and the
measured largest relative parameter distance from PyTorch after the last step, into
docs/conventions.md between the markers, and every figure into
docs/performance/compare_training.json. Every row names its command and machine. Minutes per
row on a 2-core CPU (``--steps``/``--rows`` for fewer); not run by the test suite (each row's
claim is backed by parity_tests/test_recipes.py over 3 steps).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import common
from densenet_parity import side_by_side as engine

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conventions.md"
OUT = ROOT / "docs" / "performance" / "compare_training.json"
BEGIN, END = "<!-- optimizers:begin -->", "<!-- optimizers:end -->"
#: the MLP family (house prices, batch 128) has a table and a JSON of its own
OUT_MLP = ROOT / "docs" / "performance" / "compare_training_house_mlp.json"
BEGIN_MLP, END_MLP = "<!-- optimizers-mlp:begin -->", "<!-- optimizers-mlp:end -->"
#: The MLP on the house prices diverges under the book's SGD rates (lr 2^-5 with momentum
#: 0.875: its loss is not a number by step 18): its SGD rows run at these rates instead, each
#: exact in float32 where the book's is (2^-10), and not where it is not (0.001 for 0.03).
MLP_SGD_LR = {"0.03125": "0.0009765625", "0.03": "0.001"}
#: ... and its Adam rows at 1e-4: at the book's 1e-3 the MLP's run amplifies rounding (two
#: PyTorch runs whose inputs differ by 1e-13 are 1.3e-9 apart by step 11 and 3.2e-2 by step
#: 100; at 1e-4, 2.8e-12 after 100 steps), so that no two programs can agree to 1e-9 there.
MLP_ADAM_LR = {"0.001": "0.0001"}
MACHINE = "AMD EPYC, 2 cores, 24 GB, no GPU"

#: (what, recipe, how PyTorch / Gluon / optax users write it: build_optimizer in each mirror)
ROWS = [
    ("SGD", "sgd lr=0.03125",
     "`SGD(params, lr)`", "`Trainer(params, 'sgd', {'learning_rate'})`", "`optax.sgd(lr)`"),
    ("momentum", "sgd lr=0.03125 momentum=0.875",
     "`SGD(..., momentum=m)`: `buf = m buf + g; w -= lr buf`",
     "`'sgd', {'momentum': m}`: `mom = m mom - lr g; w += mom`",
     "`optax.sgd(lr, momentum=m)` (`trace`: `buf = m buf + g`)"),
    ("Nesterov", "sgd lr=0.03125 momentum=0.875 nesterov=1",
     "`SGD(..., nesterov=True)`", "`Trainer(..., 'nag', {'momentum': m})`",
     "`optax.sgd(lr, momentum=m, nesterov=True)`"),
    ("Nesterov + weight decay", "sgd lr=0.03125 momentum=0.875 nesterov=1 weight_decay=0.0009765625",
     "`SGD(..., nesterov=True, weight_decay=wd)`", "`'nag', {'momentum': m, 'wd': wd}`",
     "`chain(add_decayed_weights(wd), sgd(lr, m, nesterov=True))`"),
    ("dampening", "sgd lr=0.03125 momentum=0.875 dampening=0.5",
     "`SGD(..., dampening=d)` (first buffer: the whole gradient)", "no dampening: `'sgd'` with m",
     "no dampening: `chain(scale(1 - d), sgd(lr, m))`"),
    ("weight decay, BN and biases excluded",
     "sgd lr=0.03125 momentum=0.875 weight_decay=0.0009765625 exclude=bn,bias",
     "two parameter groups, `weight_decay=0` in one", "`wd` with `p.wd_mult = 0` on the excluded",
     "`add_decayed_weights(wd, mask)` before `sgd`"),
    ("momentum under a schedule", "sgd lr=0.03125 momentum=0.875 schedule=cosine",
     "`CosineAnnealingLR(opt, T)`, `.step()` a step",
     "`'sgd', {'lr_scheduler': CosineScheduler(...)}`",
     "`optax.sgd(cosine_decay_schedule(lr, T), m)`"),
    ("step schedule per epoch",
     "sgd lr=0.03125 momentum=0.875 schedule=step step_size=1 gamma=0.5 per=epoch",
     "`StepLR(opt, 1, 0.5)`, `.step()` an epoch",
     "`FactorScheduler`, `trainer.set_learning_rate` an epoch",
     "`exponential_decay(lr, 1, 0.5, staircase=True)` of the epoch"),
    ("a rate float32 cannot hold", "sgd lr=0.03 momentum=0.9",
     "`SGD(..., lr=0.03, momentum=0.9)`", "the same (`sgd_mom_update`: float32 arguments)",
     "`optax.sgd(0.03, momentum=0.9)`"),
    ("Adam", "adam lr=0.001",
     "`Adam(params, lr, betas, eps)`", "`'adam', {'beta1', 'beta2', 'epsilon'}`",
     "`optax.adam(lr, b1, b2, eps)`"),
    ("Adam + L2 (coupled)", "adam lr=0.001 weight_decay=0.0009765625",
     "`Adam(..., weight_decay=wd)`", "`'adam', {'wd': wd}`",
     "`chain(add_decayed_weights(wd), adam(lr))`"),
    ("AdamW (decoupled)", "adamw lr=0.001 weight_decay=0.0625 exclude=bn,bias",
     "`AdamW(groups, lr, weight_decay=wd)`", "no AdamW in 1.9.1: `'adam', {'wd': wd}`",
     "`optax.adamw(lr, weight_decay=wd, mask=mask)`"),
]


def is_mlp(preset: str) -> bool:
    import densenet_spec as spec
    return isinstance(spec.get_preset(preset), spec.MLPPreset)


def recipe_for(preset: str, recipe: str) -> str:
    """A row's recipe for ``preset``: the MLP's rows at MLP_SGD_LR's and MLP_ADAM_LR's
    rates."""
    if not is_mlp(preset):
        return recipe
    rates = MLP_SGD_LR if recipe.startswith("sgd ") else MLP_ADAM_LR
    return " ".join(f"lr={rates.get(w[3:], w[3:])}" if w.startswith("lr=") else w
                    for w in recipe.split())


def run(rows, preset: str, steps: int, batch_size: int, size, backends, log=print,
        done=None):
    """Each row's run; ``done(records)`` after each (the figures so far written out)."""
    out = []
    for what, recipe, *_ in rows:
        recipe = recipe_for(preset, recipe)
        t0 = time.time()
        result = engine.compare_training(preset, recipe, steps, "float64", batch_size,
                                         None if is_mlp(preset) else size, backends,
                                         progress=log, every=max(1, steps // 4))
        record = {"what": what, "recipe": recipe, "seconds": round(time.time() - t0, 1),
                  "agree": result["agree"], "source": result["source"],
                  "diverged": result.get("diverged"),
                  "preset": preset, "batch_size": result["batch_size"], "backends": {}}
        for name, e in result["backends"].items():
            if name == "torch":
                continue
            record["backends"][name] = {"limits": e["limits"], "params": e["final"]["params"],
                                        "params_where": e["params_where"][
                                            max(result["steps_shown"], 1) - 1],
                                        "stats": e["final"]["stats"], "verdict": e["verdict"]}
        log(f"{what}: {record['seconds']} s, " + ", ".join(
            f"{n} {b['params']:.1e}" for n, b in record["backends"].items()))
        out.append(record)
        if done is not None:
            done(out)
    return out


def merge(old: list, new: list) -> list:
    """``new``'s backends added to ``old``'s records of the same row (by what and recipe),
    each keeping the command that measured it; rows ``old`` lacks appended."""
    by = {(r["what"], r["recipe"]): r for r in old}
    for r in new:
        if (r["what"], r["recipe"]) in by:
            o = by[(r["what"], r["recipe"])]
            o["backends"].update(r["backends"])
            o["agree"] = o["agree"] and r["agree"]
            o.setdefault("seconds_more", []).append(r["seconds"])
        else:
            old.append(r)
    return old


def table(records, rows, command: str, source: str) -> str:
    how = {r[0]: r[2:] for r in rows}
    lines = [f"Measured by `{command}` on {MACHINE}: {source}; "
             "every backend from the same canonical weights on the same batches; the distance "
             "is the largest relative distance from PyTorch of any parameter after the last "
             "float64 step (biases whose exact gradient is 0 judged apart: "
             "[training.md](training.md#training-side-by-side-densenet-compare-training)). "
             "\"exact\": the backend names no limit.", "",
             "| Optimiser / option | PyTorch | Gluon (MXNet 1.9.1) | optax (Flax) | recipe "
             "| Gluon computes | optax computes | distance: mxnet / flax-nnx / flax-linen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        t, g, o = how[r["what"]]
        b = r["backends"]

        def said(name):
            lim = b.get(name, {}).get("limits")
            return "exact" if not lim else "; ".join(lim).replace("|", "/")

        dist = " / ".join(f"{b[n]['params']:.1e}" if n in b else "-"
                          for n in ("mxnet", "flax-nnx", "flax-linen"))
        lines.append(f"| {r['what']} | {t} | {g} | {o} | `{r['recipe']}` | {said('mxnet')} "
                     f"| {said('flax-nnx')} | {dist} |")
    return "\n".join(lines)


def write_doc(text: str, begin: str = BEGIN, end: str = END) -> None:
    doc = DOC.read_text()
    if begin not in doc:
        raise SystemExit(f"{DOC}: no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_training",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="book",
                    help="book (its table in docs/conventions.md) or house_mlp (the MLP family "
                         "on the house prices: a table of its own)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default 8 images (book), 128 rows (house_mlp)")
    ap.add_argument("--size", type=int, default=64, help="the images' side (conv family)")
    ap.add_argument("--rows", default="", help="comma-separated row numbers (1-based), all by "
                                               "default")
    ap.add_argument("--backends", default="torch,mxnet,flax-nnx,flax-linen",
                    help="torch first (flax-linen computes what flax-nnx does, bit for bit, in "
                         "every run so far: leaving it out saves a quarter)")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's backends to the rows already in the JSON (each "
                         "command named in the table)")
    ap.add_argument("--no-write", action="store_true", help="print, write nothing into docs/")
    ap.add_argument("--json", default=None, help=f"where the figures go (default {OUT}, or "
                                                  f"{OUT_MLP.name} for house_mlp)")
    args = ap.parse_args(argv)
    mlp = is_mlp(args.preset)
    batch_size = args.batch_size or (128 if mlp else 8)
    json_path = Path(args.json or (OUT_MLP if mlp else OUT))
    rows = [ROWS[int(i) - 1] for i in args.rows.split(",") if i] or ROWS
    command = "python -m benchmarks.compare_training" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (
            ("preset", args.preset), ("steps", args.steps), ("batch_size", args.batch_size),
            ("size", None if mlp else args.size), ("rows", args.rows),
            ("backends", args.backends)) if v is not None and v != ap.get_default(k)) + (
        " --merge" if args.merge else "")
    commands, before = [command], []
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        commands = old.get("commands", [old["command"]]) + [command]
        before = old["rows"]

    def done(records):
        records = merge([dict(r, backends=dict(r["backends"])) for r in before], records)
        source = (f"{args.preset}, {records[0]['source']}, batch {records[0]['batch_size']}, "
                  f"{args.steps} steps")
        text = table(records, ROWS, "` and `".join(commands), source)
        print(text, flush=True)
        json_path.write_text(json.dumps({"command": commands[-1], "commands": commands,
                                         "machine": MACHINE, "machine_detail": common.machine(),
                                         "steps": args.steps, "batch_size": batch_size,
                                         "size": None if mlp else args.size, "rows": records},
                                        indent=1))
        if not args.no_write:
            write_doc(text, *((BEGIN_MLP, END_MLP) if mlp else (BEGIN, END)))

    run(rows, args.preset, args.steps, batch_size, args.size,
        [b.strip() for b in args.backends.split(",") if b.strip()],
        log=lambda s: print(s, flush=True), done=done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
