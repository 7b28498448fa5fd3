"""Config sweeps of every kernel on this GPU; the winners go to the GPU's config file.

    python -m bench.autotune [--quick] [--kernels decode,prefill,expanded,write_cache] [--out FILE]
                             [--budget SECONDS] [--results FILE] [--skip-tma] [--skip-gluon]

Per kernel, the shape classes of ``mla_kernels._tuning`` (decode: the latent width and rows per sequence,
S_q x H, in buckets of 16/32/64/more, each benchmarked at heads 1..128, S_q 1..8, pages 1/16/64 and batch x context
from 1 x 32k to 128 x 4k; prefill and expanded: new tokens x history; write_cache: a decode step or a prompt).
Every candidate config (tiles, warps, stages, decode's split count and Hopper TMA switch) is checked against
the PyTorch path before it is timed with ``triton.testing.do_bench``; configs that fail to compile, run out of
shared memory or registers, or give wrong results are pruned and listed, never fatal. Each class prints its
heuristic (before) and its winner (after); the winner is written at once to ``--out`` (default
``mla_kernels/configs/<device-slug>.json``, the file shipped for this GPU; merged into what is there) with the
device name, SM count, triton/torch versions, date and git commit. The full report (every class's times and
pruned configs) goes to ``--results`` (default ``bench/results/autotune_<device>.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import _harness as h


def _config_file(text: str) -> str:
    """``--out``: a .json file that can be written, refused at once (an argparse error), not by a traceback from
    the sweep (a folder) or after the first class was swept (``--results`` likewise, through ``h.out_arg``)."""
    if not h.names_json_file(text):
        raise argparse.ArgumentTypeError(f"{text!r}: the config file to write must end in .json")
    return h.out_arg(text)


def parse_args(argv=None) -> argparse.Namespace:
    from mla_kernels._autotune import KERNELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer benchmark shapes and configs per class")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, from {','.join(KERNELS)}")
    parser.add_argument("--out", default=None, type=_config_file,
                        help="config file to write (default on a GPU mla_kernels/configs/<device-slug>.json; "
                             "off a GPU, where only tests tune with their own timer, nothing unless given)")
    parser.add_argument("--results", default=None, type=h.out_arg,
                        help="report JSON, or a folder for it (default bench/results/autotune_<device>.json)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no new shape class after this (what is finished is written)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cuda, cuda:N; cpu needs a timer")
    parser.add_argument("--skip-tma", action="store_true",
                        help="leave the tensor-descriptor (TMA) decode configs out (if its native parity test failed)")
    parser.add_argument("--skip-gluon", action="store_true",
                        help="leave the Gluon decode config out (if its native parity test failed or hung)")
    args = parser.parse_args(argv)
    args.kernels = list(dict.fromkeys(k.strip() for k in args.kernels.split(",") if k.strip()))
    bad = [k for k in args.kernels if k not in KERNELS]
    if bad:
        parser.error(f"--kernels: unknown {bad}; choose from {','.join(KERNELS)}")
    if not args.kernels:  # an empty list would tune every kernel
        parser.error(f"--kernels: none given; choose from {','.join(KERNELS)}")
    if args.budget is not None and not args.budget >= 0:
        parser.error(f"--budget: seconds >= 0, got {args.budget}")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: auto, cpu, cuda or cuda:N, got {args.device!r}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and device.index is not None and count and device.index >= count:
            parser.error(f"--device: {args.device} names GPU {device.index}, but torch sees {count}")
    return args


def main(argv=None, *, timer=None, shapes=None) -> list[dict]:
    """``timer`` and ``shapes`` (kernel -> shape dicts) are for tests: the CPU has no do_bench."""
    from mla_kernels import _autotune, _tuning

    args = parse_args(argv)
    device = h.pick_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if timer is None and device.type != "cuda":
        raise SystemExit("bench.autotune times kernels with triton.testing.do_bench: it needs a GPU")
    name = h.device_name(device)
    # off a GPU (tests, with a timer) the interpreter's timings belong in no shipped file: written only with --out
    out = Path(args.out) if args.out else (
        _tuning.CONFIG_DIR / f"{_tuning.device_slug(name)}.json" if device.type == "cuda" else None)
    print(f"{name}: tuning {', '.join(args.kernels)}{' (--quick)' if args.quick else ''} -> {out}")
    done: list[dict] = []

    def report(res=None):  # rewritten after every class, so a run cut short leaves its report too
        if res is not None:
            done.append(res)
        return h.write_json("autotune", {"config_file": None if out is None else str(out), "quick": args.quick,
                                         "kernels": args.kernels, "classes": done}, device, args.results)

    results = _autotune.sweep(args.kernels, shapes, quick=args.quick, device=device, out=out, timer=timer,
                              check=h.check_close, budget_s=args.budget, progress=h.progress, log=h.log,
                              source=f"python -m bench.autotune{' --quick' if args.quick else ''} on {name}",
                              on_result=report, skip=[p for p in ("tma", "gluon") if getattr(args, f"skip_{p}")])
    print("\nbefore (heuristic) / after (winner), geometric mean over each class's shapes:")
    for res in results:
        print(_autotune.format_result(res))
    pruned = sum(len(r.get("pruned", [])) for r in results)
    print(f"\n{sum(r.get('winner') is not None for r in results)}/{len(results)} classes tuned, "
          f"{pruned} candidates pruned (see the report); configs: "
          f"{out or 'not written (no --out off a GPU)'}")
    print(f"report: {report()}")
    return results


if __name__ == "__main__":
    main()
