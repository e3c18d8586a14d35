"""VAE posterior families at one budget: test −ELBO, −log p(x) and seconds per epoch, into docs/benchmarks.md.

Runs ``examples/vae.py`` once per family (``vi_flows.families.NAMES``; ``--families``) with the same
data, architecture, epochs, batch size, learning rate, seed and evaluation (``K`` importance samples per
test image), one after the other in this process, and writes a table into ``docs/benchmarks.md``
between ``<!-- vae:start -->`` and ``<!-- vae:end -->`` (one sub-block per data set, so digits and
MNIST runs keep each other's tables).

    python benchmarks/vae.py                                  # load_digits, 40 epochs, K = 200
    python benchmarks/vae.py --data ../shared/data/binarized_mnist.npz --train-size 20000 --epochs 5 \\
        --test-size 200 --iw-samples 100

``--from-json --note TEXT`` re-renders the last run's table (``benchmarks/results/vae_*.json``) with a note;
``--merge`` adds this run's families to that file's rows (replacing rows of the same family) instead of
starting a new table. ``--train-seconds S``: every family trains for the same wall-clock budget (``--epochs`` is
then a maximum; the table gives the epochs each family got); ``--eval-seconds S``: evaluation stops after the
group of test images that passes ``S`` (the table gives how many were evaluated).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re

import torch

from vi_flows.families import AMORTIZED_NAMES, NAMES, canonical

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
START, END = "<!-- vae:start -->", "<!-- vae:end -->"
PUBLISHED = (
    "Published on statically binarized MNIST (about 2000 epochs on a GPU, K = 5000): −ELBO 86.55 (no flow), "
    "86.06 (planar), 84.20 (IAF) in van den Berg et al. 2018, Table 2; 82.82 (FFJORD, Grathwohl et al. 2019)."
)
DOCS_COMMANDS = (
    "```bash\n"
    "python benchmarks/vae.py                                  # load_digits, 40 epochs, K = 200\n"
    "python benchmarks/vae.py --data ../shared/data/binarized_mnist.npz --train-size 20000 --epochs 5 \\\n"
    "    --test-size 200 --iw-samples 100\n"
    "```"
)
# Test −ELBO in nats on statically binarized MNIST, by posterior family: van den Berg, Hasenclever, Tomczak, Welling,
# "Sylvester Normalizing Flows for Variational Inference", UAI 2018, Table 2 (no flow, planar, IAF, Householder
# Sylvester); Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, "FFJORD", ICLR 2019, Table 3 (CNF).
_PUBLISHED = {"normal": 86.55, "planar": 86.06, "iaf": 84.20, "sylvester": 83.32, "cnf": 82.82}
# by every name of a family, aliases included: rows of earlier runs say "none"
PUBLISHED_NEG_ELBO = {n: _PUBLISHED[canonical(n)] for n in AMORTIZED_NAMES if canonical(n) in _PUBLISHED}


def load_example():
    spec = importlib.util.spec_from_file_location("vae_example", os.path.join(ROOT, "examples", "vae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="binarized-MNIST .npz; default sklearn load_digits")
    families = list(NAMES)
    p.add_argument("--families", nargs="+", default=families)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--iw-samples", type=int, default=200)
    p.add_argument("--train-seconds", type=float, default=None, help="wall-clock training budget per family")
    p.add_argument("--eval-seconds", type=float, default=None, help="evaluation budget per family (fewer images)")
    p.add_argument("--eval-chunk", type=int, default=None, help="rows of z per evaluation pass (examples/vae.py)")
    p.add_argument("--extra", default="", help="more examples/vae.py options, e.g. '--hidden 512'")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: steadier timings when shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default=DOC, help="markdown file to update")
    p.add_argument("--out", default=None, help="folder of the JSON results (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="smoke run: examples/vae.py --quick for every family")
    p.add_argument("--note", default="", help="a paragraph appended to the table (e.g. why an ordering differs)")
    p.add_argument("--from-json", action="store_true", help="re-render the table of the last run (with --note)")
    p.add_argument("--merge", action="store_true", help="add the rows to the last run's (same family: replaced)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per family; ``args.on_rows(rows)``, if set, after each (a run cut by a timeout keeps its rows)."""
    save = getattr(args, "on_rows", None)
    example = load_example()
    rows = []
    for flow in args.families:
        argv = ["--flow", flow, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        argv += ["--iw-samples", str(args.iw_samples), "--device", args.device, "--seed", str(args.seed)]
        argv += ["--data", args.data] if args.data else []
        argv += ["--train-size", str(args.train_size)] if args.train_size else []
        argv += ["--test-size", str(args.test_size)] if args.test_size else []
        for name in ("train_seconds", "eval_seconds", "eval_chunk"):
            value = getattr(args, name, None)
            argv += [f"--{name.replace('_', '-')}", str(value)] if value else []
        argv += args.extra.split() + (["--quick"] if args.quick else [])
        result = example.main(argv, log=lambda msg, flow=flow: print(f"[{flow}] {msg}", flush=True))
        model = result.pop("model")
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["num_flows"] = model.posterior.num_flows
        result["threads"], result["date"] = torch.get_num_threads(), datetime.date.today().isoformat()
        rows.append(result)
        if save:
            save(rows)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    r0 = rows[0]
    data = "binarized MNIST" if r0["data"] else "load_digits (8x8, pixel > 7)"
    device = r0["device"] if r0["device"] != "cpu" else f"CPU ({platform.machine()}, {r0['threads']} thread(s))"
    timed = bool(r0.get("train_seconds"))
    epochs = f"{r0['train_seconds']:.0f} s of training" if timed else f"{r0['epochs']} epoch{'s' * (r0['epochs'] != 1)}"
    published = bool(r0["data"]) and any(r["flow"] in PUBLISHED_NEG_ELBO for r in rows)
    budget = (
        f"{r0['train_size']} training images, {epochs} of batch {r0['batch_size']} "
        f"(Adam, lr {r0['lr']}), latent {r0['latent_dim']}, MLP width {r0['hidden']}; evaluated on "
        f"{r0['test_size']} test images with K = {r0['iw_samples']} importance samples each; seed {r0['seed']}; "
        f"{device}; {r0['date']}"
    )
    if len({r["test_size"] for r in rows}) > 1:
        budget += " (fewer test images where the --eval-seconds budget ran out: see the column)"
    if len({r["iw_samples"] for r in rows}) > 1:
        budget += " (K differs by family: see the column)"
    extra = (["epochs"] if timed else []) + (["test images"] if len({r["test_size"] for r in rows}) > 1 else [])
    extra += ["K"] if len({r["iw_samples"] for r in rows}) > 1 else []
    extra += ["published −ELBO"] if published else []
    lines = [
        f"### VAE on {data}",
        "",
        f"Budget: {budget}.",
        "",
        "| posterior | flows | parameters | train −ELBO, last epoch | test −ELBO | test −log p(x) "
        "| s / epoch | eval s |" + "".join(f" {c} |" for c in extra),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for r in rows:
        cells = {
            "epochs": f"{r.get('epochs_trained', r['epochs']):.2f}",
            "test images": str(r["test_size"]),
            "K": str(r["iw_samples"]),
            "published −ELBO": f"{PUBLISHED_NEG_ELBO[r['flow']]:.2f}" if r["flow"] in PUBLISHED_NEG_ELBO else "–",
        }
        lines.append(
            f"| {r['flow']} | {r['num_flows']} | {r['parameters']:,} | {r['train_neg_elbo']:.2f} "
            f"| {r['test_neg_elbo']:.2f} | {r['test_nll']:.2f} "
            f"| {r['sec_per_epoch']:.2f} | {r['eval_seconds']:.0f} |" + "".join(f" {cells[c]} |" for c in extra)
        )
    lines += [
        "",
        "In nats per image. Train −ELBO: mean of the minibatch estimates during the last epoch. "
        "s / epoch: median over epochs of the training time, families run one after the other in one process "
        "on a machine shared with other jobs. −ELBO uses one draw per image; −log p(x) is the importance-sampled "
        "estimate with its own K draws. The CNF (ODE net widths (64, 64), dopri5 at rtol = atol = 1e-3) trains "
        "with a Hutchinson trace (d = 64 > 10) and is evaluated with the exact trace.",
    ]
    if published:
        lines += [
            "",
            "Published −ELBO: van den Berg et al. 2018 (Sylvester normalizing flows), Table 2 (no flow, planar, IAF, "
            "Householder Sylvester), and Grathwohl et al. 2019 (FFJORD), Table 3 (CNF), after about 2000 epochs "
            "with larger networks.",
        ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def write_block(section: str, key: str, path: str) -> None:
    """Put ``section`` between this data set's markers inside the vae block of ``path`` (created if missing)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    sub_start, sub_end = f"<!-- vae:{key}:start -->", f"<!-- vae:{key}:end -->"
    sub = f"{sub_start}\n{section}\n{sub_end}"
    if START not in text:
        intro = f"## VAE with flow posteriors (`benchmarks/vae.py`)\n\n{DOCS_COMMANDS}\n\n{PUBLISHED}"
        text = f"{text.rstrip()}\n\n{START}\n{intro}\n\n{END}\n"
    head, rest = text.split(START, 1)
    block, tail = rest.split(END, 1)
    pattern = re.compile(re.escape(sub_start) + ".*?" + re.escape(sub_end), re.S)
    block = pattern.sub(lambda _: sub, block) if pattern.search(block) else f"{block.rstrip()}\n\n{sub}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}{block}{END}{tail}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    key = ("mnist" if args.data else "digits") + ("-quick" if args.quick else "")
    path = os.path.join(args.out or os.path.join(HERE, "results"), f"vae_{key}.json")
    if args.from_json:
        with open(path) as f:
            rows = json.load(f)
    else:
        kept = []
        if args.merge and os.path.exists(path):
            with open(path) as f:
                kept = [r for r in json.load(f) if r["flow"] not in args.families]
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def save(new_rows):
            with open(path, "w") as f:
                json.dump(kept + new_rows, f, indent=1)

        args.on_rows = save
        rows = kept + run(args)
        save(rows[len(kept) :])
    section = table(rows, args)
    print(section)
    write_block(section, key, args.doc)
    return rows


if __name__ == "__main__":
    main()
