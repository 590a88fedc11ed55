"""Train a language model with product-key memory layers.

    python train.py --config configs/tiny_pkm.yaml [key.sub=value ...] [--resume [CHECKPOINT]]
    python train.py --config configs/tiny_pkm_parallel.yaml --init-from runs/tiny/checkpoints/step_0000300.pt
    torchrun --nproc_per_node=8 train.py --config configs/12L_pkm.yaml data.dir=data/wiki
    srun python train.py --config configs/12L_pkm.yaml --resume     (see scripts/slurm/train.sbatch)

Exit status: 0 done, 2 bad config/data/checkpoint (one line on stderr), 75 stopped by SIGUSR1/SIGTERM after
checkpointing (rerun with --resume to continue).
"""

import argparse
import os
import sys

from pkmlm import cli
from pkmlm.config import load_config
from pkmlm.distributed import detect_env
from pkmlm.eval.evaluation import perplexity
from pkmlm.memory.kernels import enabled as kernels_enabled, retain_freed_memory
from pkmlm.memory.triton_kernels import mode as triton_mode
from pkmlm.training.parallel import PREEMPTED_EXIT_CODE
from pkmlm.training.trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny_pkm.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or without a path from the newest one in train.out_dir "
                             "(a fresh start when there is none, so a requeued job can always pass --resume)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start a fresh run from the matching weights of CHECKPOINT (e.g. a dense model's); "
                             "new memory parameters keep their initialisation; ignored when resuming")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: argparse gave the override to --resume; it was meant as a plain --resume.
        args.overrides.append(args.resume)
        args.resume = "latest"
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    kernels_enabled()  # a bad PKMLM_CPU_KERNELS (or PKMLM_TRITON) is reported before any work
    triton_mode()
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    result = train(config, resume=args.resume, init_from=args.init_from)
    if detect_env().is_main and result.valid_loss is not None:
        print(f"step {result.step}: valid loss {result.valid_loss:.4f}, perplexity {perplexity(result.valid_loss):.2f}")
        for name, stats in result.memory.items():
            print(f"  {name}: memory usage {stats['usage']:.1%}, KL from uniform {stats['kl_counts']:.3f}")
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    retain_freed_memory()  # CPU speed: see pkmlm.memory.kernels
    sys.exit(main())
