"""`mosaic-ray` command line: a thin argparse; each subcommand lives with the code it drives.

Subcommand modules expose `register(subparsers)` and keep heavy imports (torch, ray, transformers) inside
their handlers, so `mosaic-ray --help` and `config show` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import mosaic_ray
from mosaic_ray.config import ConfigError, load_config, preset_names, to_yaml
from mosaic_ray.errors import UserError

# Modules that add subcommands (each has `register(subparsers)`).
SUBCOMMAND_MODULES = (
    "mosaic_ray.scenarios.cli",
    "mosaic_ray.driver.evaluate",
    "mosaic_ray.driver.cli",
    "mosaic_ray.driver.suite_report",
    "mosaic_ray.plan",
    "mosaic_ray.driver.judge_eval",
    "mosaic_ray.actors.agent_service",
)


def _config_show(args: argparse.Namespace) -> int:
    if args.name is not None and args.config is not None and args.name != args.config:
        raise UserError(f"config show: preset given twice ({args.name!r} and --config {args.config!r}); "
                        f"use --config only")
    if args.name is not None:
        print(f"mosaic-ray: `config show {args.name}` is deprecated; use `config show --config {args.name}`",
              file=sys.stderr)
    cfg = load_config(args.config or args.name or "tiny-cpu", args.set)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _model_init(args: argparse.Namespace) -> int:
    from mosaic_ray.hygiene import set_torch_threads
    from mosaic_ray.models.tiny import build_tiny_model

    set_torch_threads(1)
    cfg = load_config(args.config, [f"model.tiny.vocab={args.vocab}", f"model.tiny.seed={args.seed}",
                                    *(f"model.tiny.{s}" for s in args.set)])
    out = build_tiny_model(args.out, cfg.model.tiny)
    params = json.loads((out / "mosaic_tiny.json").read_text())["params"]
    print(f"tiny model ({cfg.model.tiny.vocab} vocab, {params:,} parameters) written to {out}")
    return 0


def _build_base(args: argparse.Namespace) -> int:
    import time

    from mosaic_ray.models.base import BaseRecipe, build_release

    recipe = BaseRecipe()
    t0 = time.perf_counter()

    def progress(step: int, loss: float, elapsed: float) -> None:
        if step % 100 == 0 or step == recipe.steps - 1:
            print(f"step {step + 1}/{recipe.steps}: loss {loss:.3f} ({elapsed:.0f} s)", flush=True)

    out = build_release(args.out, recipe, on_step=progress)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"base model ({manifest['params']:,} parameters) written to {out} in {time.perf_counter() - t0:.0f} s; "
          f"model.safetensors sha256 {manifest['files']['model.safetensors']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic-ray", description="MOSAIC on Ray: train agents that know when "
                                     "to act and when to refuse.")
    parser.add_argument("--version", action="version",
                        version=f"mosaic-ray {mosaic_ray.__version__} ({Path(mosaic_ray.__file__).parent})")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print a resolved config")
    show.add_argument("--config", default=None,
                      help=f"preset ({', '.join(preset_names())}) or YAML path (default tiny-cpu)")
    show.add_argument("name", nargs="?", default=None, help="deprecated alias of --config")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    show.set_defaults(func=_config_show)

    model = sub.add_parser("model", help="build models")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser("init", help="build the tiny offline model (tokenizer + Qwen3 LM) as an HF directory")
    init.add_argument("--out", required=True, help="new or empty output directory")
    init.add_argument("--vocab", choices=["bpe", "qwen"], default="bpe")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--config", default="tiny-cpu", help="preset whose model.tiny section sets the shape")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a model.tiny key, e.g. --set hidden_size=256")
    init.set_defaults(func=_model_init)
    base = model_sub.add_parser("build-base", help="rebuild the shipped base model (`builtin:tiny-base`) and its "
                                "manifest, bit for bit (about 35 minutes on one CPU core)")
    base.add_argument("--out", required=True, help="new or empty output directory")
    base.set_defaults(func=_build_base)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # ConfigError, TaskFileError, ...: one line naming what and where, no traceback
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"mosaic-ray: {kind}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
